"""Gradient clipping by the LightningModule: one norm computation, logged, and fused AdamW under bf16."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from llmkit.lit.module import LitLM

MODEL = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
LR = 1e-2


def fit(steps: int = 4, clip: float | None = 1.0, **trainer_options: object) -> tuple[LitLM, dict[str, float]]:
    fused = trainer_options.pop("fused", None)
    torch.manual_seed(0)
    lit = LitLM(model=MODEL, optim={"name": "adamw", "lr": LR, "fused": fused}, scheduler={"name": "constant"})
    # counting sequences from random starts (next token = this one + 1): learnable within a few steps
    starts = torch.randint(0, 37, (steps * 4, 1), generator=torch.Generator().manual_seed(1))
    tokens = (starts + torch.arange(17)) % 37
    batches = DataLoader([(row[:-1], row[1:]) for row in tokens], batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, gradient_clip_val=clip, log_every_n_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **trainer_options,
    )
    trainer.fit(lit, train_dataloaders=batches)
    return lit, {k: float(v) for k, v in trainer.logged_metrics.items()}


def test_fused_adamw_takes_the_foreach_step_under_bf16_mixed_with_clipping() -> None:
    # Lightning's AMP plugin alone refuses this combination ("does not allow for gradient clipping").
    # One step from the same weights: both optimizers get the same bf16-mixed gradients, clipped by the
    # same code, so the weights may differ only by fp32 rounding of the update (Adam's first step moves
    # each weight by about lr): 1e-4 of a step is still ~50x an fp32 ulp of these weights.
    fused, fused_logs = fit(steps=1, precision="bf16-mixed", fused=True)
    plain, plain_logs = fit(steps=1, precision="bf16-mixed", fused=False)
    for (name, a), b in zip(fused.model.state_dict().items(), plain.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=LR * 1e-4, msg=name)
    assert fused_logs["train/grad_norm"] == plain_logs["train/grad_norm"] > 1.0  # so clipping acted


def test_fused_adamw_trains_under_bf16_mixed_with_clipping_like_the_foreach_one() -> None:
    # Over several steps the runs' weights differ in fp32 rounding, which bf16 activations turn into
    # 2^-8 relative differences in gradients, and Adam's normalised update can turn those into a whole
    # step for a weight with a tiny gradient: weights are not comparable, the training loss is. It must
    # fall, by the same amount to within 2% of the starting loss (a few bf16 roundings' worth).
    fused, fused_logs = fit(steps=6, precision="bf16-mixed", fused=True)
    plain, plain_logs = fit(steps=6, precision="bf16-mixed", fused=False)
    start = fit(steps=1, precision="bf16-mixed", fused=False)[1]["train/loss"]
    assert fused_logs["train/loss"] < start - 0.05 and plain_logs["train/loss"] < start - 0.05
    assert fused_logs["train/loss"] == pytest.approx(plain_logs["train/loss"], abs=0.02 * start)


def test_clipping_scales_gradients_to_the_max_norm_and_logs_the_norm_before_clipping(monkeypatch) -> None:
    lit, _ = fit(steps=1, clip=0.5)
    optimizer = lit.trainer.optimizers[0]
    for p in lit.model.parameters():
        p.grad = torch.full_like(p, 0.1)
    before = torch.nn.utils.get_total_norm([p.grad for p in lit.model.parameters()])
    logged: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(lit, "log", lambda name, value, **_: logged.update({name: value}))
    monkeypatch.setattr(lit, "_logging_step", lambda: True)

    lit.configure_gradient_clipping(optimizer, 0.5, None)
    after = torch.nn.utils.get_total_norm([p.grad for p in lit.model.parameters()])
    assert before > 1 and after == pytest.approx(0.5, rel=1e-4)
    assert logged["train/grad_norm"] == pytest.approx(before.item())


def test_without_clipping_the_gradient_norm_is_still_logged() -> None:
    lit, logs = fit(steps=2, clip=None)
    assert logs["train/grad_norm"] > 0


def test_clipping_by_value_stays_with_lightning() -> None:
    lit, logs = fit(steps=2, clip=1e-4, gradient_clip_algorithm="value")
    assert max(p.grad.abs().max().item() for p in lit.model.parameters()) <= 1e-4
    assert logs["train/grad_norm"] > 0

"""What LitLM logs each step: train/loss every step (the progress bar shows it), every other train/
metric only on the steps Lightning writes (each self.log costs ~1 ms of its bookkeeping; an online-RL
step has ~20) and on the last one, so callback_metrics end with the final values."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from llmkit.lit.module import LitLM

MODEL = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)


def test_train_metrics_but_the_loss_are_logged_on_logging_steps_and_the_last(monkeypatch) -> None:
    logged: list[tuple[int, str]] = []
    original = LitLM.log
    monkeypatch.setattr(LitLM, "log", lambda self, name, *a, **k: logged.append((self.global_step + 1, name))
                        or original(self, name, *a, **k))
    torch.manual_seed(0)
    lit = LitLM(model=dict(MODEL, ffn={"name": "moe", "n_experts": 4, "top_k": 2}),  # aux losses and expert load
                optim={"name": "adamw", "lr": 1e-3}, scheduler={"name": "constant"})
    tokens = torch.randint(0, 37, (20, 17), generator=torch.Generator().manual_seed(1))
    trainer = L.Trainer(accelerator="cpu", max_steps=5, log_every_n_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lit, train_dataloaders=DataLoader([(row[:-1], row[1:]) for row in tokens], batch_size=4))
    steps_of = lambda name: sorted({step for step, n in logged if n == name})  # noqa: E731
    assert steps_of("train/loss") == [1, 2, 3, 4, 5]
    others = {name for _, name in logged if name.startswith("train/") and name != "train/loss"}
    assert any(name.startswith("train/aux/") for name in others) and "train/lr" in others
    for name in others:
        assert steps_of(name) == [2, 4, 5], name
    assert {"train/loss", *others} <= set(trainer.callback_metrics)

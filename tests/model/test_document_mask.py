"""Document masking for packed rows: a token attends only to earlier tokens of its own document,
and positions restart at 0 in every document, so a packed document computes exactly what it
computes alone."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from llmkit.lit.module import LitLM
from tests.model.helpers import VOCAB, tiny_config, tiny_model

KERNELS = ["eager", "sdpa", "flex"]  # those that run on CPU (flex: forward only)
POSITION_NAMES = ["none", "learned", "sinusoidal", "rope", "alibi", "t5"]
ATTENTION = {"mha": {}, "gqa": {"n_kv_heads": 2}, "window": {"n_kv_heads": 2, "window": 5}}
TOL = dict(rtol=1e-5, atol=1e-5)  # as in test_attention.py: a wrong mask or position errs by ~1e-1
DOCUMENTS = [[7, 10, 7], [12, 5, 7]]  # document lengths of each row (T = 24): rows are masked differently


def packed(lengths: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, segments), both (B, T): positions restart at 0 in each document."""
    positions = [torch.cat([torch.arange(n) for n in row]) for row in lengths]
    segments = [torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths]
    return torch.stack(positions), torch.stack(segments)


def spans(row: list[int]) -> list[tuple[int, int]]:
    ends = torch.tensor(row).cumsum(0).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _model(kernel: str, position: str, attention: str, seed: int = 0) -> torch.nn.Module:
    return tiny_model(seed, position={"name": position}, attention={"name": "causal", "kernel": kernel, **ATTENTION[attention]})


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (len(DOCUMENTS), 24), generator=torch.Generator().manual_seed(seed))


COMBINATIONS = pytest.mark.parametrize(
    "kernel,position,attention",
    [(k, p, a) for k in KERNELS for p in POSITION_NAMES for a in ATTENTION],
)


@COMBINATIONS
@torch.no_grad()
def test_a_document_cannot_see_the_documents_before_it(kernel: str, position: str, attention: str) -> None:
    model = _model(kernel, position, attention)
    positions, segments = packed(DOCUMENTS)
    idx = _tokens()
    changed = idx.clone()
    changed[:, :7] = (idx[:, :7] + 1) % VOCAB  # the first document of each row
    later = segments > 0
    masked = [model(x, positions, segments)[later] for x in (idx, changed)]
    torch.testing.assert_close(masked[1], masked[0], **TOL)
    unmasked = [model(x)[later] for x in (idx, changed)]  # control: one long document sees everything
    assert (unmasked[1] - unmasked[0]).abs().max() > 1e-3


@COMBINATIONS
@torch.no_grad()
def test_packed_document_computes_what_it_computes_alone(kernel: str, position: str, attention: str) -> None:
    positions, segments = packed(DOCUMENTS)
    idx = _tokens()
    logits = _model(kernel, position, attention)(idx, positions, segments)
    reference = _model("eager", position, attention)  # the same weights; flex is slow on CPU
    for b, row in enumerate(DOCUMENTS):
        for start, end in spans(row):
            alone = reference(idx[b : b + 1, start:end])  # positions 0..n-1 by default, no segments
            torch.testing.assert_close(logits[b : b + 1, start:end], alone, **TOL)


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
@pytest.mark.parametrize("position", POSITION_NAMES)
@pytest.mark.parametrize("attention", ATTENTION)
@torch.no_grad()
def test_kernels_match_eager_on_packed_rows(kernel: str, position: str, attention: str) -> None:
    positions, segments = packed(DOCUMENTS)
    idx = _tokens()
    expected = _model("eager", position, attention)(idx, positions, segments)
    torch.testing.assert_close(_model(kernel, position, attention)(idx, positions, segments), expected, **TOL)


def test_segments_with_shared_positions_follow_the_same_mask() -> None:
    """Segments mask by index even when positions are the (T,) default: the documents stay apart."""
    model = _model("sdpa", "rope", "mha")
    _, segments = packed(DOCUMENTS)
    idx = _tokens()
    changed = idx.clone()
    changed[:, :7] = (idx[:, :7] + 1) % VOCAB
    with torch.no_grad():
        a, b = (model(x, segments=segments)[segments > 0] for x in (idx, changed))
    torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "t5"])
def test_loss_backward_on_packed_rows_matches_between_eager_and_sdpa(position: str) -> None:
    positions, segments = packed(DOCUMENTS)
    idx = _tokens()
    grads = {}
    for kernel in ("eager", "sdpa"):
        model = _model(kernel, position, "window").train()
        out = model.loss(idx[:, :-1], idx[:, 1:], positions[:, :-1], segments[:, :-1])
        out.loss.backward()
        grads[kernel] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert torch.isfinite(grads[kernel]).all() and grads[kernel].abs().sum() > 0
    torch.testing.assert_close(grads["sdpa"], grads["eager"], **TOL)


def test_one_document_per_row_equals_no_masking() -> None:
    """Segments of zeros and positions 0..T-1 are exactly the unpacked batch (a different kernel path)."""
    model = _model("sdpa", "alibi", "gqa")
    idx = _tokens()
    positions, segments = packed([[24], [24]])
    with torch.no_grad():
        torch.testing.assert_close(model(idx, positions, segments), model(idx), **TOL)


def _lit_module(model_seed: int = 0) -> LitLM:
    lit = LitLM(
        model=tiny_config(position={"name": "rope"}, attention={"name": "causal", "n_kv_heads": 2}).to_dict(),
        optim={"name": "adamw", "lr": 1e-3, "weight_decay": 0.1},
        scheduler={"name": "constant", "warmup_steps": 0},
    )
    torch.manual_seed(model_seed)
    lit.configure_model()
    return lit


def test_lightning_fit_takes_packed_and_plain_batches() -> None:
    """training_step and validation_step unpack (inputs, targets[, positions, segments])."""
    positions, segments = packed(DOCUMENTS)
    idx = _tokens()
    packed_rows = [(idx[b, :-1], idx[b, 1:], positions[b, :-1], segments[b, :-1]) for b in range(len(DOCUMENTS))]
    plain_rows = [(idx[b, :-1], idx[b, 1:]) for b in range(len(DOCUMENTS))]
    for rows in (packed_rows, plain_rows):
        lit = _lit_module()
        before = lit.model.head.weight.detach().clone()
        trainer = L.Trainer(
            accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0,
        )
        loader = DataLoader(rows, batch_size=2)
        trainer.fit(lit, train_dataloaders=loader, val_dataloaders=loader)
        assert trainer.global_step == 3
        assert torch.isfinite(trainer.callback_metrics["val/loss"])
        assert not torch.equal(lit.model.head.weight, before)


def test_training_step_passes_positions_and_segments_to_the_model() -> None:
    lit = _lit_module()
    lit.log = lambda *args, **kwargs: None  # no trainer attached
    lit._logging_step = lambda: False
    positions, segments = packed(DOCUMENTS)
    idx = _tokens()
    batch = (idx[:, :-1], idx[:, 1:], positions[:, :-1], segments[:, :-1])
    expected = lit.model.loss(*batch).loss
    assert torch.equal(lit.training_step(batch, 0), expected)
    assert not torch.equal(lit.training_step(batch[:2], 0), expected)  # the 2-tuple: one long document

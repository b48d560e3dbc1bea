"""Packing: best-fit-decreasing on hand examples, the exact row layout, one sample per row without
packing, and the point of it all: a document's loss in a packed row is its loss alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmkit.posttrain.packing import best_fit_decreasing, pack
from llmkit.text.chat import Rendered
from tests.model.helpers import VOCAB, tiny_model

X = -100


def test_best_fit_decreasing_by_hand() -> None:
    # longest first: 7 -> row 0 (3 left); 4 -> row 1 (6 left); 4 -> row 1 (2 left); 2 -> the
    # tightest row that holds it, row 1 (2 left), not row 0 (3 left) as first-fit would choose
    assert best_fit_decreasing([2, 7, 4, 4], 10) == [[1], [2, 3, 0]]
    # ties: the earlier sample first, and the earlier of equally tight rows
    assert best_fit_decreasing([5, 5, 5, 5, 5], 10) == [[0, 1], [2, 3], [4]]
    assert best_fit_decreasing([6, 6, 3, 4], 10) == [[0, 3], [1, 2]]
    assert best_fit_decreasing([], 10) == []


def test_lengths_must_fit() -> None:
    for lengths in ([3, 11], [3, 0]):
        with pytest.raises(ValueError, match="truncate first"):
            best_fit_decreasing(lengths, 10)
    with pytest.raises(ValueError, match="truncate first"):
        pack([Rendered([1] * 7, [X] * 7)], 6, packing=False)


A = Rendered([1, 2, 3], [2, 3, X])
B = Rendered([4, 5], [5, X])
C = Rendered([6, 7, 8, 9], [X, 8, 9, X])


def test_packed_rows_exactly() -> None:
    packed = pack([A, B, C], 6, pad_id=0)
    assert packed.rows == [[2, 1], [0]]  # C (4) then B (2) fill row 0; A has row 1
    np.testing.assert_array_equal(packed.ids, [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]])
    np.testing.assert_array_equal(packed.labels, [[X, 8, 9, X, 5, X], [2, 3, X, X, X, X]])
    np.testing.assert_array_equal(packed.positions, [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]])
    np.testing.assert_array_equal(packed.segments, [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]])  # padding: its own
    assert packed.ids.dtype == np.int64 and packed.fill == 9 / 12
    again = pack([A, B, C], 6, pad_id=0)  # deterministic
    assert all(np.array_equal(getattr(packed, f), getattr(again, f)) for f in ("ids", "labels", "positions", "segments"))


def test_without_packing_each_sample_has_its_own_row() -> None:
    packed = pack([A, B, C], 5, packing=False, pad_id=7)
    assert packed.rows == [[0], [1], [2]]
    np.testing.assert_array_equal(packed.ids, [[1, 2, 3, 7, 7], [4, 5, 7, 7, 7], [6, 7, 8, 9, 7]])
    np.testing.assert_array_equal(packed.labels, [[2, 3, X, X, X], [5, X, X, X, X], [X, 8, 9, X, X]])
    np.testing.assert_array_equal(packed.positions, [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2], [0, 1, 2, 3, 0]])
    np.testing.assert_array_equal(packed.segments, [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])


def _documents(lengths: list[int]) -> list[Rendered]:
    """Random token documents with some targets masked, as chat rendering leaves them."""
    g = torch.Generator().manual_seed(0)
    docs = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        scored = torch.rand(n, generator=g) < 0.7
        docs.append(Rendered(ids, [t if s else X for t, s in zip(ids[1:], scored[1:].tolist(), strict=True)] + [X]))
    return docs


def _summed_losses(model, row: dict[str, torch.Tensor], n_docs: int, positions, segments) -> torch.Tensor:
    """Each document's summed token loss in one packed row, (n_docs,), with the model given these
    positions (T,) and segments (T,) or None."""
    logits = model(row["ids"][None], positions[None], None if segments is None else segments[None])[0]  # (T, V)
    per_token = F.cross_entropy(logits, row["labels"], ignore_index=X, reduction="none")  # (T,), 0 where ignored
    return torch.stack([per_token[row["segments"] == d].sum() for d in range(n_docs)])


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@torch.no_grad()
def test_a_documents_loss_in_a_packed_row_equals_its_loss_alone(kernel: str) -> None:
    model = tiny_model(attention={"name": "causal", "kernel": kernel})  # learned positions, max_seq_len 24
    docs = _documents([9, 8, 5])  # 22 tokens: one row of 24, with 2 of padding
    packed = pack(docs, 24)
    assert packed.rows == [[0, 1, 2]]
    row = {f: torch.from_numpy(getattr(packed, f)[0]) for f in ("ids", "labels", "positions", "segments")}
    in_row = _summed_losses(model, row, 3, row["positions"], row["segments"])
    alone = torch.stack([
        F.cross_entropy(model(torch.tensor([d.ids]))[0], torch.tensor(d.labels), ignore_index=X, reduction="sum") for d in docs
    ])
    # fp32: the packed row's attention reduces over 24 keys (the masked ones weigh exactly 0) where a
    # document alone has <= 9, so sums run in another order and round differently (~1e-7 relative).
    # Each summed loss is ~15-26 (~7 tokens of ~ln(37) = 3.6), where one fp32 step is 1.9e-6: the
    # measured difference is that one step; 1e-5 allows a few. A leak across documents moves the
    # loss by > 1e-3 (0.02-0.4 measured; checked below).
    torch.testing.assert_close(in_row, alone, atol=1e-5, rtol=0)

    # the same row without the document mask, or without restarting positions, gives other losses
    # for every document after the first: the check above can tell a correct packing from a wrong one
    leaky = _summed_losses(model, row, 3, row["positions"], None)
    shifted = _summed_losses(model, row, 3, torch.arange(24), row["segments"])
    for wrong in (leaky, shifted):
        assert ((wrong[1:] - alone[1:]).abs() > 1e-3).all()
    assert torch.allclose(shifted[0], alone[0], atol=1e-5)  # the first document starts at 0 either way

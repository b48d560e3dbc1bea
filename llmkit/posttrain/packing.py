"""Packing rendered samples into fixed rows of `context` tokens for the model.

Best-fit-decreasing: samples go longest first, each into the open row with the least space that
still holds it (a new row when none does). It wastes less than first-fit on the many-short-samples
shape of SFT data and is deterministic: ties go to the earlier sample and the earlier row.

Per row, four (context,) arrays, ready for `Transformer.loss(ids, labels, positions, segments)`:

    ids        the samples' tokens back to back, then pad_id
    labels     the samples' labels (-100 where unscored), then -100
    positions  0, 1, ... restarting at each sample, as if it were alone in the row
    segments   0, 1, ... one per sample; the padding is a segment of its own

Attention stays within a segment, and positions restart, so a sample's loss in a packed row is
the loss it has alone (tests/posttrain/test_packing.py checks it). Padding as its own segment
attends only to padding: nothing reads across from it, and no row of the attention is all masked.
`packing=False` gives each sample a row of its own, padded the same way.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

IGNORE = -100


class Sample(Protocol):
    ids: list[int]
    labels: list[int]


class _OpenRows:
    """Rows with space left, found by space: `take(n)` gives the tightest that holds n tokens.
    Bucketed by space (at most `capacity` distinct values), so each step is a bisect, not a scan."""

    def __init__(self) -> None:
        self.spaces: list[int] = []  # sorted distinct keys of by_space
        self.by_space: dict[int, list[int]] = {}  # space left -> heap of rows (lowest index first)

    def take(self, n: int) -> tuple[int, int] | None:
        k = bisect.bisect_left(self.spaces, n)
        if k == len(self.spaces):
            return None
        space = self.spaces[k]
        row = heapq.heappop(self.by_space[space])
        if not self.by_space[space]:
            del self.by_space[space], self.spaces[k]
        return row, space

    def put(self, row: int, space: int) -> None:
        if space not in self.by_space:
            bisect.insort(self.spaces, space)
            self.by_space[space] = []
        heapq.heappush(self.by_space[space], row)


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` per row, in the order they were placed; every row sums to <= capacity."""
    _check_lengths(lengths, capacity)
    rows: list[list[int]] = []
    open_rows = _OpenRows()
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep input order
        n = lengths[i]
        found = open_rows.take(n)
        row, space = found if found is not None else (len(rows), capacity)
        if found is None:
            rows.append([])
        rows[row].append(i)
        if space > n:
            open_rows.put(row, space - n)
    return rows


def _check_lengths(lengths: Sequence[int], capacity: int) -> None:
    bad = [n for n in lengths if not 0 < n <= capacity]
    if bad:
        raise ValueError(f"sample lengths must be in 1..{capacity} (the context); got {bad[:5]}: truncate first")


@dataclass(frozen=True)
class Packed:
    """(R, context) int64 arrays; rows[r]: the sample indices in row r, in order."""

    ids: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    rows: list[list[int]]

    @property
    def fill(self) -> float:
        """The fraction of positions that hold sample tokens (not padding)."""
        return float((self.segments < self._pad_segment()).mean()) if self.ids.size else 0.0

    def _pad_segment(self) -> np.ndarray:
        return np.array([len(r) for r in self.rows])[:, None]  # (R, 1): padding's segment per row


def _fill_row(out: tuple[np.ndarray, ...], r: int, samples: Sequence[Sample], members: list[int]) -> None:
    ids, labels, positions, segments = out
    at = 0
    for segment, i in enumerate(members):
        n = len(samples[i].ids)
        ids[r, at : at + n] = samples[i].ids
        labels[r, at : at + n] = samples[i].labels
        positions[r, at : at + n] = np.arange(n)
        segments[r, at : at + n] = segment
        at += n
    positions[r, at:] = np.arange(ids.shape[1] - at)  # padding: its own segment, positions from 0
    segments[r, at:] = len(members)


def pack(samples: Sequence[Sample], context: int, packing: bool = True, pad_id: int = 0) -> Packed:
    """Rows of `context` tokens: best-fit-decreasing when packing, else one sample per row (in
    order). Every sample must already fit (chat.truncate). pad_id: any id; it is never attended
    to by a sample nor scored."""
    for i, s in enumerate(samples):
        if len(s.ids) != len(s.labels):
            raise ValueError(f"sample {i}: {len(s.ids)} ids but {len(s.labels)} labels")
    lengths = [len(s.ids) for s in samples]
    _check_lengths(lengths, context)
    rows = best_fit_decreasing(lengths, context) if packing else [[i] for i in range(len(samples))]
    shape = (len(rows), context)
    out = (np.full(shape, pad_id, np.int64), np.full(shape, IGNORE, np.int64), *np.zeros((2, *shape), np.int64))
    for r, members in enumerate(rows):
        _fill_row(out, r, samples, members)
    return Packed(*out, rows=rows)

"""Streaming prepared shards into batches, addressed by a global sample index.

Every training sample has a global index j = 0, 1, 2, ... across all ranks and epochs. The
global batch at step k is samples [k*W*B, (k+1)*W*B) for W ranks of B rows, and rank r takes
rows [r*B, (r+1)*B) of it. DataLoader workers receive whole batches round-robin, so every
(rank, worker) pair reads a disjoint set of samples and the order does not depend on how many
workers there are. Resuming needs one number, the samples already consumed: the stream then
continues exactly, also when the number of ranks changes (the same samples in the same order,
grouped into the new global batch).

Sample j maps to tokens in two steps:
  Mixture       j -> (component c, index i within c): per block of MIX_BLOCK samples each component
                gets its weight's share of slots, in an order shuffled from (seed, block).
  Packed        i -> epoch e = i // n and sequence order_e[i % n] of that component's n packed
                sequences (seq_len + 1 tokens at stride seq_len: every token is an input once an
                epoch), order_e a permutation drawn from (seed, e). `random` windows instead start
                at a hash of (seed, i) anywhere in the stream (nanoGPT's sampling).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from llmkit.data.shards import Shard

MIX_BLOCK = 4096
_MASK64 = (1 << 64) - 1


class TokenStream:
    """One split of one component: its shards read as one token sequence, opened lazily in each
    process (memory maps are not sent to DataLoader workers)."""

    def __init__(self, paths: Sequence[Path], entries: Sequence[dict[str, Any]], dtype: np.dtype) -> None:
        self.paths, self.entries, self.dtype = list(paths), list(entries), dtype
        lengths = [e["tokens"] for e in entries]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (shards + 1,)
        self.total = int(self.offsets[-1])
        self._shards: list[Shard] | None = None
        self._doc_starts: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_shards": None, "_doc_starts": None}

    @property
    def shards(self) -> list[Shard]:
        if self._shards is None:
            self._shards = [Shard.open(p, e, self.dtype) for p, e in zip(self.paths, self.entries, strict=True)]
        return self._shards

    @property
    def doc_starts(self) -> np.ndarray:
        """(documents,) int64 global offsets where documents begin."""
        if self._doc_starts is None:
            parts = [s.doc_starts.astype(np.int64) + off for s, off in zip(self.shards, self.offsets[:-1], strict=True)]
            self._doc_starts = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._doc_starts

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        out, filled = np.empty(length, np.int64), 0
        while filled < length:
            lo = start + filled - int(self.offsets[shard])
            piece = self.shards[shard].tokens[lo : lo + length - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out

    def read_rows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(R, length) int64: row r is tokens [starts[r], starts[r] + length). Rows inside one
        shard are gathered together; the rare row that crosses a shard boundary is read alone."""
        if len(self.offsets) == 2:  # one shard: a single gather
            return self.shards[0].tokens[starts[:, None] + np.arange(length)].astype(np.int64)
        shard_of = np.searchsorted(self.offsets, starts, side="right") - 1  # (R,)
        local = starts - self.offsets[shard_of]
        inside = starts + length <= self.offsets[shard_of + 1]
        out = np.empty((len(starts), length), np.int64)
        for shard in np.unique(shard_of[inside]):
            rows = np.flatnonzero(inside & (shard_of == shard))
            out[rows] = self.shards[shard].tokens[local[rows, None] + np.arange(length)]  # (rows, length)
        for row in np.flatnonzero(~inside):
            out[row] = self.read(int(starts[row]), length)
        return out

    def document_layout(self, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """positions (restarting at each document start, or at the window start) and segment ids
        (0, 1, ... per document within the window), each (R, length) int64."""
        starts = np.asarray(starts, np.int64)
        first = np.searchsorted(self.doc_starts, starts, side="right")  # (R,) first document start after the row's
        last = np.searchsorted(self.doc_starts, starts + length, side="left")
        if (last - first).sum() <= 2 * len(starts):  # few boundaries (documents longer than rows): a short loop wins
            return self._layout_by_boundary(starts, first, last, length)
        return self._layout_vectorised(starts, first, last, length)

    def _layout_by_boundary(
        self, starts: np.ndarray, first: np.ndarray, last: np.ndarray, length: int
    ) -> tuple[np.ndarray, np.ndarray]:
        segments = np.zeros((len(starts), length), np.int64)
        positions = np.tile(np.arange(length), (len(starts), 1))  # (R, length)
        for row in np.flatnonzero(last > first):
            for offset in self.doc_starts[first[row] : last[row]] - starts[row]:
                segments[row, offset:] += 1
                positions[row, offset:] -= positions[row, offset]
        return positions, segments

    def _layout_vectorised(
        self, starts: np.ndarray, first: np.ndarray, last: np.ndarray, length: int
    ) -> tuple[np.ndarray, np.ndarray]:
        counts = last - first  # documents beginning inside each row
        rows = np.repeat(np.arange(len(starts)), counts)
        docs = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(first, counts)
        boundary = np.zeros((len(starts), length), bool)
        boundary[rows, self.doc_starts[docs] - starts[rows]] = True
        column = np.arange(length)
        segment_begin = np.maximum.accumulate(np.where(boundary, column, 0), axis=1)
        return column - segment_begin, np.cumsum(boundary, axis=1)


class PackedSequences:
    """The stream cut into n sequences of seq_len + 1 tokens at stride seq_len, visited in a fresh
    permutation every epoch."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int, shuffle: bool = True) -> None:
        self.stream, self.seq_len, self.seed, self.shuffle = stream, seq_len, seed, shuffle
        self.n = (stream.total - 1) // seq_len
        if self.n < 1:
            raise ValueError(f"{stream.total} tokens are too few for one sequence of {seq_len} tokens")
        self._order: tuple[int, np.ndarray] | None = None

    def starts(self, i: np.ndarray) -> np.ndarray:
        epochs, within = np.divmod(i, self.n)
        if epochs[0] == epochs[-1] and len(i) == i[-1] - i[0] + 1:  # consecutive indices in one epoch
            return self._epoch_order(int(epochs[0]))[within] * self.seq_len
        out = np.empty(len(i), np.int64)
        for epoch in np.unique(epochs):
            mine = epochs == epoch
            out[mine] = self._epoch_order(int(epoch))[within[mine]] * self.seq_len
        return out

    def start(self, i: int) -> int:
        return int(self.starts(np.array([i]))[0])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._order[1]


class RandomWindows:
    """Windows of seq_len + 1 tokens at pseudo-random offsets, a pure function of (seed, i)."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int) -> None:
        if stream.total <= seq_len + 1:
            raise ValueError(f"{stream.total} tokens are too few for windows of {seq_len} tokens")
        self.stream, self.seq_len, self.seed = stream, seq_len, seed
        self.n = stream.total - seq_len - 1  # possible start offsets

    def starts(self, i: np.ndarray) -> np.ndarray:
        key = np.uint64((self.seed * 0x9E3779B97F4A7C15) & _MASK64)
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the hash intends
            hashed = _mix64(np.asarray(i, np.uint64) + key)
        return (hashed % np.uint64(self.n)).astype(np.int64)

    def start(self, i: int) -> int:
        return int(self.starts(np.array([i]))[0])


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: consecutive inputs give independent-looking 64-bit outputs."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Mixture:
    """Global sample j -> (component, index within it) with each component's share fixed per block."""

    def __init__(self, weights: Sequence[float], seed: int, block: int = MIX_BLOCK) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {list(weights)}")
        self.counts = _largest_remainder(w / w.sum(), block)  # (components,) slots per block
        if (self.counts[w > 0] == 0).any():
            raise ValueError(f"a mixture weight in {list(weights)} is below 1/{block} of the total and would never be drawn")
        self.seed, self.block = seed, block
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def locate_many(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(component, index within it) for every global sample index in j."""
        blocks, slots = np.divmod(j, self.block)
        components, indices = np.empty(len(j), np.int64), np.empty(len(j), np.int64)
        for block in np.unique(blocks):
            mine = blocks == block
            layout, ranks = self._layout(int(block))
            components[mine] = layout[slots[mine]]
            indices[mine] = block * self.counts[components[mine]] + ranks[slots[mine]]
        return components, indices

    def locate(self, j: int) -> tuple[int, int]:
        c, i = self.locate_many(np.array([j]))
        return int(c[0]), int(i[0])

    def _layout(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] != block:
            components = np.repeat(np.arange(len(self.counts)), self.counts)
            np.random.default_rng([self.seed, 7919, block]).shuffle(components)
            ranks = np.zeros(self.block, np.int64)  # how many earlier slots of the block share the component
            for c in range(len(self.counts)):
                mine = components == c
                ranks[mine] = np.arange(int(mine.sum()))
            self._cache = (block, components, ranks)
        return self._cache[1], self._cache[2]


def _largest_remainder(fractions: np.ndarray, total: int) -> np.ndarray:
    exact = fractions * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def samples_consumed(trainer, batch_size: int, start_sample: int, start_step: int) -> int:
    """Global training samples consumed by every rank together since the run (or its resume) began at
    start_sample / start_step: checkpoints are written at optimizer steps, each of which takes
    accumulate x world x batch_size samples. A datamodule's checkpoint state is this one number."""
    if trainer is None:
        return start_sample
    per_step = trainer.accumulate_grad_batches * trainer.world_size * batch_size
    return start_sample + (trainer.global_step - start_step) * per_step


class EndlessBatchIndices(Sampler[int]):
    """Batch indices 0, 1, 2, ... without end: training length is counted in optimizer steps
    (trainer.max_steps), so there are no epochs to restart; a resume moves TrainBatches' first sample."""

    def __iter__(self) -> Iterator[int]:
        return itertools.count()


class TrainBatches(Dataset):
    """Item k is this rank's k-th batch: global samples start + (k*W + r)*B + [0, B)."""

    def __init__(
        self, components: Sequence[PackedSequences | RandomWindows], mixture: Mixture, batch_size: int,
        rank: int = 0, world_size: int = 1, start_sample: int = 0, document_mask: bool = False,
    ) -> None:
        self.components, self.mixture, self.batch_size = list(components), mixture, batch_size
        self.rank, self.world_size, self.start_sample = rank, world_size, start_sample
        self.document_mask = document_mask

    def sample_ids(self, k: int) -> np.ndarray:
        first = self.start_sample + (k * self.world_size + self.rank) * self.batch_size
        return np.arange(first, first + self.batch_size)

    # A fetch runs between training steps with cold CPU caches, where every numpy call costs several
    # times its warm price, so the common cases below take as few calls as they can.
    def __getitem__(self, k: int) -> tuple[torch.Tensor, ...]:
        ids = self.sample_ids(k)
        if len(self.components) == 1:  # no mixture: sample j of the only component is its j-th
            source = self.components[0]
            parts = windows(source.stream, source.starts(ids), source.seq_len, self.document_mask)
            return tuple(torch.from_numpy(np.ascontiguousarray(part)) for part in parts)
        components, indices = self.mixture.locate_many(ids)
        columns: list[np.ndarray] | None = None
        for c in np.unique(components):
            rows = np.flatnonzero(components == c)
            source = self.components[c]
            parts = windows(source.stream, source.starts(indices[rows]), source.seq_len, self.document_mask)
            columns = columns or [np.empty((len(ids), *p.shape[1:]), np.int64) for p in parts]
            for column, part in zip(columns, parts, strict=True):
                column[rows] = part
        return tuple(torch.from_numpy(column) for column in columns)


def windows(stream: TokenStream, starts: np.ndarray, seq_len: int, document_mask: bool) -> tuple[np.ndarray, ...]:
    """(inputs, targets) or (inputs, targets, positions, segments), each (R, seq_len) int64."""
    tokens = stream.read_rows(starts, seq_len + 1)  # (R, seq_len + 1)
    if not document_mask:
        return tokens[:, :-1], tokens[:, 1:]
    positions, segments = stream.document_layout(starts, seq_len)
    return tokens[:, :-1], tokens[:, 1:], positions, segments


class ValidationWindows(Dataset):
    """The fixed validation set: the first windows of each component's validation split, at stride
    seq_len, shared out by weight; rank r evaluates windows r, r + W, ..."""

    def __init__(
        self, streams: Sequence[TokenStream], weights: Sequence[float], seq_len: int, max_windows: int,
        rank: int = 0, world_size: int = 1, document_mask: bool = False,
    ) -> None:
        available = [max(0, (s.total - 1) // seq_len) for s in streams]
        wanted = _largest_remainder(np.asarray(weights, np.float64) / sum(weights), max_windows)
        items = []  # (stream, start offset)
        for stream, n, want in zip(streams, available, wanted, strict=True):
            items += [(stream, w * seq_len) for w in range(min(n, int(want)))]
        if len(items) < world_size:
            raise ValueError(f"the validation split has {len(items)} windows of {seq_len} tokens, fewer than {world_size} ranks")
        self.items = items[rank::world_size]
        self.seq_len, self.document_mask = seq_len, document_mask

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        stream, start = self.items[i]
        return tuple(torch.from_numpy(a[0]) for a in windows(stream, np.array([start]), self.seq_len, self.document_mask))

"""Datasets over a flat array of token ids.

Training batches are addressed by a global batch index k: batch k on rank r is a fixed function
of (seed, r, k). Resuming therefore needs only the number of batches already consumed, and the
order does not depend on the number of DataLoader workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each (B, seq_len), for windows starting at `starts`."""
    idx = starts[:, None] + np.arange(seq_len + 1)  # (B, T + 1)
    chunk = torch.from_numpy(tokens[idx].astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


class RandomWindowBatches(Dataset):
    """Item k is a whole batch of windows at random offsets, drawn from (seed, rank, k)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0) -> None:
        if len(tokens) <= seq_len + 1:
            raise ValueError(f"{len(tokens)} training tokens are too few for windows of {seq_len} tokens")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank = seed, rank

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, k])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        return windows(self.tokens, starts, self.seq_len)


class ResumableBatchSampler(Sampler[int]):
    """Yields global batch indices k = start, start + 1, ... without end: training length is
    counted in optimizer steps (trainer.max_steps), so there are no epochs to restart mid-way,
    and a resume only sets `start` to the number of batches already consumed."""

    def __init__(self, start: int = 0) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class SequentialWindows(Dataset):
    """Validation: consecutive non-overlapping windows, this rank's share of at most max_windows."""

    def __init__(self, tokens: np.ndarray, seq_len: int, max_windows: int, rank: int = 0, world_size: int = 1) -> None:
        total = min((len(tokens) - 1) // seq_len, max_windows)
        if total < world_size:
            raise ValueError(f"{len(tokens)} validation tokens are too few for windows of {seq_len} tokens")
        self.tokens, self.seq_len = tokens, seq_len
        self.starts = np.arange(rank, total, world_size) * seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = windows(self.tokens, self.starts[i : i + 1], self.seq_len)
        return x[0], y[0]

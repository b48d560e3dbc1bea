"""Prepared post-training rows on disk, and the batches that stream them and resume exactly.

A prepared post-training dataset is a directory of one `.npz` per split, each a set of arrays with
one row per training sample (SFT: ids, labels, positions, segments of packed rows; preference:
chosen and rejected rows), plus `manifest.json` with the settings fingerprint and the counts that
go into summary.json. The manifest is written last and atomically, so a directory without it is
incomplete and is prepared again, never read.

Batches follow pre-training's addressing (llmkit/data/streaming.py): sample j of the whole run is
row order_e[j % R] of epoch e = j // R (order_e a permutation drawn from (seed, e)); rank r's k-th
micro-batch holds samples start + (k*W + r)*B + [0, B). Resuming needs the samples consumed.

Each batch also carries `step_scored`: the scored tokens of the whole optimizer step it belongs to
(every micro-batch of the accumulation, every rank). A loss summed over a micro-batch's scored
tokens and divided by it, times accumulation x world (which Lightning and DDP divide by again), is
the token mean over the whole step however it is split: micro-batch 8 x accumulation 1 and 2 x 4
give the same gradient (tests/posttrain/test_sft.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from llmkit.posttrain.packing import IGNORE

MANIFEST = "manifest.json"


def save_rows(directory: Path, splits: dict[str, dict[str, np.ndarray]], manifest: dict[str, Any]) -> None:
    """Write the splits' arrays, then the manifest; into a temporary sibling renamed into place."""
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for split, arrays in splits.items():
        np.savez(tmp / f"{split}.npz", **arrays)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if directory.exists():  # an incomplete earlier attempt (no manifest): replaced
        shutil.rmtree(directory)
    tmp.rename(directory)


def load_rows(directory: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    manifest = json.loads((directory / MANIFEST).read_text())
    splits = {}
    for split in manifest["splits"]:
        with np.load(directory / f"{split}.npz") as data:
            splits[split] = {name: data[name] for name in data.files}
    return splits, manifest


def is_prepared(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


def scored_per_row(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """(R,) scored tokens of each sample: the labels of every *labels array (chosen and rejected count both)."""
    return sum((arrays[name] != IGNORE).sum(axis=1) for name in arrays if name.endswith("labels"))


class RowBatches(Dataset):
    """Item k is this rank's k-th micro-batch: a dict of (B, ...) tensors plus `step_scored`."""

    def __init__(
        self, arrays: dict[str, np.ndarray], batch_size: int, seed: int, shuffle: bool = True, rank: int = 0,
        world_size: int = 1, accumulate: int = 1, start_sample: int = 0,
    ) -> None:
        self.arrays = arrays
        self.rows = len(next(iter(arrays.values())))
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size, self.accumulate, self.start_sample = rank, world_size, accumulate, start_sample
        self.scored = scored_per_row(arrays)
        self._order: tuple[int, np.ndarray] | None = None

    def rows_of(self, samples: np.ndarray) -> np.ndarray:
        """Global sample indices -> row indices (each epoch its own permutation)."""
        out = np.empty_like(samples)
        for epoch in np.unique(samples // self.rows):
            where = samples // self.rows == epoch
            out[where] = self._permutation(int(epoch))[samples[where] % self.rows]
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.rows) if self.shuffle else np.arange(self.rows)
            self._order = (epoch, order)
        return self._order[1]

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        per_micro = self.world_size * self.batch_size
        first = self.start_sample + k * per_micro + self.rank * self.batch_size
        rows = self.rows_of(np.arange(first, first + self.batch_size))
        batch = {name: torch.from_numpy(np.ascontiguousarray(a[rows])) for name, a in self.arrays.items()}
        per_step = per_micro * self.accumulate
        step_start = self.start_sample + (k // self.accumulate) * per_step
        step_rows = self.rows_of(np.arange(step_start, step_start + per_step))
        batch["step_scored"] = torch.tensor(int(self.scored[step_rows].sum()))
        return batch


class RowWindows(Dataset):
    """Validation: every row of a split once, in order, as (B, ...) batches by the DataLoader."""

    def __init__(self, arrays: dict[str, np.ndarray], rank: int = 0, world_size: int = 1) -> None:
        self.arrays = {name: a[rank::world_size] for name, a in arrays.items()}

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.ascontiguousarray(a[i])) for name, a in self.arrays.items()}

"""Where each preparation stage writes, inside a build's work directory (renamed into the dataset when complete).

    <work>/<component>/clean/{split}.jsonl        cleaned documents, by split (published)
    <work>/<component>/cleaning_report.json       what each filter removed and why (published)
    <work>/tokenizer/                             the tokenizer (published)
    <work>/<component>/{split}_NNNNN.bin          token shards (published)
    <work>/manifest.json                          written last (published)
    <work>/.prep/<component>/pieces/NNNNN/        per piece: docs.jsonl (documents that passed the per-document
                                                  filters), sha.npy (their digests, sorted), minhash.npy, bands.npy
    <work>/.prep/<component>/exact/QQQ.npy        positions of exact duplicates, per digest partition
    <work>/.prep/<component>/candidates/BBB.npy   positions sharing band BBB's bucket with another document
    <work>/.prep/<component>/near_removed.npy     positions of near duplicates
    <work>/.prep/<component>/parts/<split>/NNNNN.jsonl   a piece's cleaned documents, before they are gathered
    <work>/.prep/<component>/tokens/<split>/...   token ids of a byte range of clean/{split}.jsonl
    <work>/.prep/done, errors, logs               unit markers, unit errors, submitit logs (llmkit/data/prep/tasks.py)

A document's position is (piece << 32) | index within the piece's docs.jsonl: sorting positions is input order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmkit.data.prep.tasks import PREP

CLEAN_DIR, TOKENIZER_DIR, REPORT = "clean", "tokenizer", "cleaning_report.json"
_PIECE_SHIFT = np.uint64(32)


def prep(work: Path, component: str) -> Path:
    return Path(work) / PREP / component


def piece_dir(work: Path, component: str, piece: int) -> Path:
    return prep(work, component) / "pieces" / f"{piece:05d}"


def part_path(work: Path, component: str, split: str, piece: int) -> Path:
    return prep(work, component) / "parts" / split / f"{piece:05d}.jsonl"


def clean_path(work: Path, component: str, split: str) -> Path:
    return Path(work) / component / CLEAN_DIR / f"{split}.jsonl"


def positions(piece: int, count: int) -> np.ndarray:
    return (np.uint64(piece) << _PIECE_SHIFT) | np.arange(count, dtype=np.uint64)


def piece_slice(sorted_positions: np.ndarray, piece: int) -> np.ndarray:
    """The indices within `piece` among sorted positions."""
    lo, hi = np.searchsorted(sorted_positions, [np.uint64(piece) << _PIECE_SHIFT, np.uint64(piece + 1) << _PIECE_SHIFT])
    return (sorted_positions[lo:hi] & np.uint64(0xFFFFFFFF)).astype(np.int64)


def piece_indices(files: list[Path], piece: int) -> set[int]:
    """The indices within `piece` listed in sorted position files, reading only that piece's range of each."""
    found: set[int] = set()
    for file in files:
        found.update(piece_slice(np.load(file, mmap_mode="r"), piece).tolist())
    return found


def piece_of(position: np.ndarray) -> np.ndarray:
    return (position >> _PIECE_SHIFT).astype(np.int64)


def load_positions(files: list[Path]) -> np.ndarray:
    """The sorted union of position arrays (every unit writes its file, empty or not: a missing one is an error)."""
    arrays = [np.load(f) for f in files]
    return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, np.uint64)

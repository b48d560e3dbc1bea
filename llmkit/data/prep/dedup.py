"""Exact and near-duplicate detection across all pieces of a component, in the stages datatrove's MinHash pipeline
uses (signatures per piece, then buckets, then clusters, then a filter pass: prep_clean.filter_piece):

    minhash_piece     per piece: MinHash signatures (n, num_perm) and LSH band keys (bands, n) of its documents
    exact_partition   per slice of digest space: every document whose SHA-256 an earlier document had is an exact
                      duplicate (the earliest is kept)
    band_candidates   per LSH band: the documents that share their bucket with another document
    near_clusters     one unit: the candidates, in input order, through the same LSHIndex the one-process filter
                      uses: a candidate is a near duplicate when an earlier kept one matches it

Documents that share no bucket with any other document can neither be near duplicates nor make another one, so the
last, sequential unit sees only candidates, and it decides exactly as dedup.NearDuplicateFilter would streaming the
whole component in one process (exact duplicates skipped, as the Cleaner never shows them to its near filter).
Memory: a band unit holds 16 bytes per document of the component; the clusters unit holds the signatures of the
kept candidates (4 * num_perm bytes each).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.data.dedup import NearDuplicateFilter
from llmkit.data.encode import batched_by_chars
from llmkit.data.files import atomic_path, save_array_atomic
from llmkit.data.prep import layout
from llmkit.data.prep.pieces import Piece

SIGNATURE_BATCH_CHARS = 1 << 22  # texts read per signature batch: bounds memory on huge pieces


def minhash_piece(near_dedup: dict[str, Any], piece: Piece, work: str, documents: int) -> dict[str, Any]:
    near = NearDuplicateFilter(**near_dedup)
    folder = layout.piece_dir(Path(work), piece.component, piece.index)
    if documents == 0:  # numpy cannot map an empty file
        save_array_atomic(folder / "minhash.npy", np.zeros((0, near.num_perm), np.uint32))
        save_array_atomic(folder / "bands.npy", np.zeros((near.bands, 0), np.uint64))
        return {"documents": 0}
    with atomic_path(folder / "minhash.npy") as sig_tmp, atomic_path(folder / "bands.npy") as band_tmp:
        signatures = np.lib.format.open_memmap(sig_tmp, "w+", np.uint32, (documents, near.num_perm))
        bands = np.lib.format.open_memmap(band_tmp, "w+", np.uint64, (near.bands, documents))  # a band is one row
        done = 0
        for texts in _text_batches(folder / "docs.jsonl"):
            sig = near.signatures(texts)
            signatures[done : done + len(texts)] = sig
            bands[:, done : done + len(texts)] = near.band_keys(sig).T
            done += len(texts)
        if done != documents:
            raise RuntimeError(f"{folder / 'docs.jsonl'} holds {done} documents, its clean stage recorded {documents}")
        signatures.flush()
        bands.flush()
        del signatures, bands
    return {"documents": documents}


def _text_batches(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        yield from batched_by_chars((json.loads(line)["text"] for line in f), SIGNATURE_BATCH_CHARS)


def exact_partition(work: str, component: str, pieces: int, part: int, parts: int) -> dict[str, Any]:
    """Exact duplicates among the documents whose digest falls in slice `part` of `parts`."""
    lo = (part << 64) // parts
    hi = ((part + 1) << 64) // parts
    hi_digests, lo_digests, positions = [], [], []
    for piece in range(pieces):
        table = np.load(layout.piece_dir(Path(work), component, piece) / "sha.npy", mmap_mode="r")
        start = np.searchsorted(table["hi"], np.uint64(lo))
        end = np.searchsorted(table["hi"], np.uint64(hi)) if hi < 1 << 64 else len(table)
        rows = np.asarray(table[start:end])
        hi_digests.append(rows["hi"])
        lo_digests.append(rows["lo"])
        positions.append(_positions(piece, rows["index"]))
    h, low, pos = (np.concatenate(a) if a else np.zeros(0, np.uint64) for a in (hi_digests, lo_digests, positions))
    order = np.lexsort((pos, low, h))  # by digest, then input order: the first of each run is kept
    h, low, pos = h[order], low[order], pos[order]
    repeat = np.zeros(len(pos), bool)
    repeat[1:] = (h[1:] == h[:-1]) & (low[1:] == low[:-1])
    removed = np.sort(pos[repeat])
    save_array_atomic(exact_path(Path(work), component, part), removed)
    return {"removed": len(removed)}


def _positions(piece: int, index: np.ndarray) -> np.ndarray:
    return (np.uint64(piece) << np.uint64(32)) | index.astype(np.uint64)


def exact_path(work: Path, component: str, part: int) -> Path:
    return layout.prep(work, component) / "exact" / f"{part:03d}.npy"


def band_candidates(work: str, component: str, pieces: int, band: int) -> dict[str, Any]:
    """Positions of the documents whose key in `band` another document shares."""
    keys, positions = [], []
    for piece in range(pieces):
        bands = np.load(layout.piece_dir(Path(work), component, piece) / "bands.npy", mmap_mode="r")
        keys.append(np.asarray(bands[band]))
        positions.append(layout.positions(piece, bands.shape[1]))
    key, pos = np.concatenate(keys), np.concatenate(positions)
    order = np.argsort(key, kind="stable")
    key, pos = key[order], pos[order]
    shared = np.zeros(len(key), bool)
    same = key[1:] == key[:-1]
    shared[1:] |= same
    shared[:-1] |= same
    candidates = np.sort(pos[shared])
    save_array_atomic(candidates_path(Path(work), component, band), candidates)
    return {"candidates": len(candidates)}


def candidates_path(work: Path, component: str, band: int) -> Path:
    return layout.prep(work, component) / "candidates" / f"{band:03d}.npy"


def near_removed_path(work: Path, component: str) -> Path:
    return layout.prep(work, component) / "near_removed.npy"


def near_clusters(near_dedup: dict[str, Any], work: str, component: str, exact_parts: int) -> dict[str, Any]:
    """Decide the near duplicates among the candidates, in input order, as the one-process filter does."""
    near = NearDuplicateFilter(**near_dedup)
    work_path = Path(work)
    candidates = layout.load_positions([candidates_path(work_path, component, b) for b in range(near.bands)])
    exact = layout.load_positions([exact_path(work_path, component, q) for q in range(exact_parts)])
    candidates = candidates[~np.isin(candidates, exact)]  # never indexed, as in the Cleaner (exact runs first)
    removed: list[int] = []
    for piece in np.unique(layout.piece_of(candidates)).tolist():
        folder = layout.piece_dir(work_path, component, piece)
        index = layout.piece_slice(candidates, piece)
        signatures = np.load(folder / "minhash.npy", mmap_mode="r")[index]
        salted = near.index.salted(np.load(folder / "bands.npy", mmap_mode="r")[:, index].T)
        for position, sig, key in zip(_positions(piece, index).tolist(), signatures, salted.tolist(), strict=True):
            if near.index.match_or_add(position, sig, key) is not None:
                removed.append(position)
    save_array_atomic(near_removed_path(work_path, component), np.array(removed, np.uint64))
    return {"candidates": len(candidates), "removed": len(removed)}

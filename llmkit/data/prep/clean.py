"""Cleaning across tasks, in three kinds of units around the dedup stages (llmkit/data/prep/dedup.py):

    clean_piece   per piece: read, transform, per-document filters (length, quality, language); the kept documents
                  and their SHA-256 digests go to the piece's folder
    filter_piece  per piece, once duplicates are known across all pieces: drop them, assign splits, write the
                  piece's part of each split
    gather_piece  per piece: copy its parts to their offsets in clean/{split}.jsonl (the parts' sizes are known,
                  so every piece writes its own range of one file, in parallel)

`merge_report` adds the pieces' reports up into the cleaning report. Everything is in input order, so the files and
the report are those one process streaming the component through one Cleaner writes (tests/data check it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.data.cleaning import Cleaner
from llmkit.data.dedup import text_digest
from llmkit.data.files import atomic_open, fault_point, save_array_atomic
from llmkit.data.prep import layout
from llmkit.data.prep.pieces import Piece, read_piece
from llmkit.data.sources import Document
from llmkit.data.splits import SPLITS, assign_splits

SHA_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("index", "<u4")])  # 128 bits of SHA-256 and the document
DEDUP_FILTERS = ("exact_dedup", "near_dedup")
_EXAMPLES = 5


def clean_piece(clean: dict[str, Any], options: dict[str, Any], piece: Piece, work: str) -> dict[str, Any]:
    """Per-document cleaning of one piece; returns its report, document count and input bytes."""
    cleaner = Cleaner(**{**clean, "exact_dedup": False, "near_dedup": None})  # dedup spans pieces: done apart
    folder = layout.piece_dir(Path(work), piece.component, piece.index)
    digests: list[bytes] = []
    counted = _ByteCounter(read_piece(options, piece))
    with atomic_open(folder / "docs.jsonl") as f:
        for name, text in cleaner(counted):
            f.write(json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n")
            digests.append(text_digest(text)[:16])
    save_array_atomic(folder / "sha.npy", _digest_table(digests))
    return {"report": cleaner.report.to_dict(), "documents": len(digests), "bytes_in": counted.bytes}


class _ByteCounter:
    def __init__(self, docs: Iterator[Document]) -> None:
        self.docs, self.bytes = docs, 0

    def __iter__(self) -> Iterator[Document]:
        for name, text in self.docs:
            self.bytes += len(text.encode("utf-8", errors="surrogatepass"))
            yield name, text


def _digest_table(digests: list[bytes]) -> np.ndarray:
    raw = np.frombuffer(b"".join(digests), dtype=[("hi", "<u8"), ("lo", "<u8")])
    table = np.empty(len(digests), SHA_DTYPE)
    table["hi"], table["lo"], table["index"] = raw["hi"], raw["lo"], np.arange(len(digests))
    table.sort(order=("hi", "lo", "index"))  # exact-dedup partitions are then contiguous ranges of it
    return table


def read_piece_docs(work: Path, component: str, piece: int) -> Iterator[Document]:
    with open(layout.piece_dir(work, component, piece) / "docs.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            yield record["name"], record["text"]


def filter_piece(
    split: dict[str, Any], piece: Piece, work: str, exact_files: list[str], near_file: str | None
) -> dict[str, Any]:
    """Drop the piece's duplicates, assign splits (`split`: method, val_fraction, test_fraction, key), write parts."""
    work_path = Path(work)
    exact = layout.piece_indices([Path(f) for f in exact_files], piece.index)
    near = layout.piece_indices([Path(near_file)], piece.index) if near_file else set()
    stats = {name: {"removed": 0, "chars": 0, "examples": []} for name in DEDUP_FILTERS}
    kept = {"documents_out": 0, "chars_out": 0}  # before splitting: what the Cleaner's report counts
    survivors = _survivors(read_piece_docs(work_path, piece.component, piece.index), exact, near, stats, kept)
    assigned = assign_splits(survivors, split["method"], split["val_fraction"], split["test_fraction"], split["key"])
    return {"dedup": stats, "splits": _write_parts(work_path, piece, assigned)} | kept


def _survivors(
    docs: Iterator[Document], exact: set[int], near: set[int], stats: dict, kept: dict[str, int]
) -> Iterator[Document]:
    for i, (name, text) in enumerate(docs):
        removed_by = "exact_dedup" if i in exact else "near_dedup" if i in near else None
        if removed_by is None:
            kept["documents_out"] += 1
            kept["chars_out"] += len(text)
            yield name, text
            continue
        entry = stats[removed_by]
        entry["removed"] += 1
        entry["chars"] += len(text)
        if len(entry["examples"]) < _EXAMPLES:
            entry["examples"].append(name)


def _write_parts(work: Path, piece: Piece, docs: Iterator[tuple[str, Document]]) -> dict[str, dict[str, int]]:
    counts = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
    paths = {s: layout.part_path(work, piece.component, s, piece.index) for s in SPLITS}
    with atomic_open(paths["train"]) as train, atomic_open(paths["val"]) as val, atomic_open(paths["test"]) as test:
        files = {"train": train, "val": val, "test": test}
        for split, (name, text) in docs:
            line = json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n"
            files[split].write(line)
            counts[split]["documents"] += 1
            counts[split]["bytes"] += len(line.encode("utf-8", errors="surrogatepass"))
    return counts


# ---- gathering the parts into clean/{split}.jsonl ----------------------------------------------------------------
def gather_offsets(filtered: list[dict[str, Any]]) -> tuple[list[dict[str, int]], dict[str, int]]:
    """Per piece, where its part of each split starts in clean/{split}.jsonl; and each file's size."""
    offsets, totals = [], dict.fromkeys(SPLITS, 0)
    for result in filtered:
        offsets.append(dict(totals))
        for split in SPLITS:
            totals[split] += result["splits"][split]["bytes"]
    return offsets, totals


def gathering_path(work: Path, component: str, split: str) -> Path:
    final = layout.clean_path(work, component, split)
    return final.with_name(f".{final.name}.gathering")


def open_gather_files(work: Path, component: str, totals: dict[str, int]) -> None:
    """Create (or keep: a resumed build) each file at its final size, for the pieces to fill in."""
    for split, size in totals.items():
        path = gathering_path(work, component, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
        os.truncate(path, size)  # the same size again changes nothing a finished piece wrote


def gather_piece(work: str, component: str, piece: int, offsets: dict[str, int]) -> dict[str, Any]:
    for split, offset in offsets.items():
        part = layout.part_path(Path(work), component, split, piece)
        target = gathering_path(Path(work), component, split)
        with open(part, "rb") as src, open(target, "r+b") as dst:
            dst.seek(offset)
            while block := src.read(1 << 22):
                dst.write(block)
            dst.flush()
            fault_point(target)
            os.fsync(dst.fileno())
    return {}


def finish_gather(work: Path, component: str) -> None:
    for split in SPLITS:
        path = gathering_path(work, component, split)
        if path.exists():  # absent: a resumed build that had renamed it already
            os.replace(path, layout.clean_path(work, component, split))


# ---- the report ---------------------------------------------------------------------------------------------------
def merge_report(clean: dict[str, Any], cleaned: list[dict[str, Any]], filtered: list[dict[str, Any]]) -> dict[str, Any]:
    """One Cleaner's report (filters in its order, with its reasons) from the pieces' results, in piece order."""
    report = Cleaner(**clean).report.to_dict()
    for part in (r["report"] for r in cleaned):
        for key in ("documents_in", "chars_in"):
            report[key] += part[key]
        for name, n in part["modified"].items():
            report["modified"][name] += n
        for name, stats in part["filters"].items():
            _add_stats(report["filters"][name], stats)
    for result in filtered:
        for name, stats in result["dedup"].items():
            if name in report["filters"]:
                _add_stats(report["filters"][name], stats)
        report["documents_out"] += result["documents_out"]
        report["chars_out"] += result["chars_out"]
    return report


def _add_stats(total: dict[str, Any], part: dict[str, Any]) -> None:
    total["removed"] += part["removed"]
    total["chars"] += part["chars"]
    total["examples"] = (total["examples"] + part["examples"])[:_EXAMPLES]

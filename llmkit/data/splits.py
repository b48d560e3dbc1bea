"""Deterministic train/val/test splits.

`hash`: a document's split is a function of its name (or its text) alone, so adding documents never
moves old ones between splits. `tail`: the last fractions of the concatenated text, as nanoGPT
splits Tiny Shakespeare (for single-file corpora, where there are no documents to hash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from llmkit.data.sources import Document

SPLITS = ("train", "val", "test")


def hash_bucket(key: str) -> float:
    """A uniform number in [0, 1) from the key's SHA-256."""
    return int(hashlib.sha256(key.encode("utf-8", errors="replace")).hexdigest()[:12], 16) / 16**12


def split_of(name: str, text: str, val_fraction: float, test_fraction: float = 0.0, key: str = "name") -> str:
    if key not in ("name", "text"):
        raise ValueError(f"unknown data.split_key '{key}'; valid: name, text")
    bucket = hash_bucket(name if key == "name" else text)
    if bucket < val_fraction:
        return "val"
    if bucket < val_fraction + test_fraction:
        return "test"
    return "train"


def assign_splits(
    docs: Iterable[Document], split: str, val_fraction: float, test_fraction: float = 0.0, key: str = "name"
) -> Iterator[tuple[str, Document]]:
    """(split name, document) pairs. `hash` streams; `tail` reads every document first."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"data.val_fraction + data.test_fraction must be in [0, 1), got {val_fraction} + {test_fraction}")
    if split == "hash":
        for name, text in docs:
            yield split_of(name, text, val_fraction, test_fraction, key), (name, text)
    elif split == "tail":
        yield from _tail_split(list(docs), val_fraction, test_fraction)
    else:
        raise ValueError(f"unknown data.split '{split}'; valid: hash, tail")


def _tail_split(docs: list[Document], val_fraction: float, test_fraction: float) -> Iterator[tuple[str, Document]]:
    text = "\n\n".join(t for _, t in docs)
    val_start = int(len(text) * (1 - val_fraction - test_fraction))
    test_start = int(len(text) * (1 - test_fraction))
    label = docs[0][0] if len(docs) == 1 else "corpus"
    for name, piece in (("train", text[:val_start]), ("val", text[val_start:test_start]), ("test", text[test_start:])):
        if piece:
            yield name, (f"{label}:{name}", piece)


def split_documents(
    docs: Iterable[Document], split: str, val_fraction: float, test_fraction: float = 0.0, key: str = "name"
) -> dict[str, list[Document]]:
    parts: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for name, doc in assign_splits(docs, split, val_fraction, test_fraction, key):
        parts[name].append(doc)
    return parts

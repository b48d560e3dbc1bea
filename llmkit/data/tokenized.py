"""Tokenized corpus on disk: train.bin and val.bin (flat token ids), the tokenizer, meta.json.

Built once by `build_tokenized` into a temporary directory that is renamed into place, so an
interrupted build never leaves a directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.data.sources import Document
from llmkit.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= np.iinfo(np.uint16).max + 1:
        return np.dtype(np.uint16)
    if vocab_size <= np.iinfo(np.uint32).max + 1:
        return np.dtype(np.uint32)
    raise ValueError(f"vocabulary of {vocab_size} tokens does not fit in uint32")


def split_documents(docs: list[Document], split: str, val_fraction: float) -> dict[str, list[str]]:
    """`tail`: the last val_fraction of the concatenated text is validation (nanoGPT's split).
    `hash`: a document is validation when the hash of its name falls below val_fraction, so
    adding documents never moves old ones between splits."""
    if split == "tail":
        text = "\n\n".join(t for _, t in docs)
        cut = int(len(text) * (1 - val_fraction))
        return {"train": [text[:cut]], "val": [text[cut:]]}
    if split == "hash":
        parts: dict[str, list[str]] = {"train": [], "val": []}
        for name, text in docs:
            bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            parts["val" if bucket < val_fraction else "train"].append(text)
        return parts
    raise ValueError(f"unknown data.split '{split}'; valid: hash, tail")


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """Documents are separated by EOS when the tokenizer has one, else by a blank line."""
    ids: list[int] = []
    for text in texts:
        if tokenizer.eos_id is None:
            ids += tokenizer.encode(text + "\n\n")
        else:
            ids += tokenizer.encode(text) + [tokenizer.eos_id]
    return np.asarray(ids, dtype=token_dtype(tokenizer.vocab_size))


@dataclass
class TokenizedCorpus:
    directory: Path
    tokenizer: Tokenizer
    meta: dict[str, Any]

    @classmethod
    def load(cls, directory: Path) -> "TokenizedCorpus":
        meta = json.loads((directory / "meta.json").read_text())
        return cls(directory, load_tokenizer(directory), meta)

    def tokens(self, split: str) -> np.ndarray:
        path = self.directory / f"{split}.bin"
        dtype = np.dtype(self.meta["dtype"])
        expected = self.meta["tokens"][split]
        size = path.stat().st_size if path.exists() else 0
        if size != expected * dtype.itemsize:  # checked before mapping: an empty file cannot be mapped
            raise ValueError(
                f"{path} has {size} bytes but meta.json says {expected} {dtype.name} tokens: the cache is damaged; "
                f"delete {self.directory} and it will be rebuilt"
            )
        return np.memmap(path, dtype=dtype, mode="r")


def build_tokenized(
    docs: list[Document], out_dir: Path, tokenizer_kind: str, vocab_size: int, split: str, val_fraction: float,
    settings: dict[str, Any],
) -> TokenizedCorpus:
    parts = split_documents(docs, split, val_fraction)
    for name in SPLITS:
        if not any(t.strip() for t in parts[name]):
            raise ValueError(
                f"the {name} split is empty ({len(docs)} documents, split={split}, val_fraction={val_fraction}); "
                "add documents, change data.val_fraction, or use data.split=tail"
            )
    tokenizer = train_tokenizer(tokenizer_kind, parts["train"], vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        counts = {}
        for name in SPLITS:
            ids = encode_documents(tokenizer, parts[name])
            ids.tofile(tmp / f"{name}.bin")
            counts[name] = int(len(ids))
        tokenizer.save(tmp)
        meta = {
            "tokens": counts, "dtype": token_dtype(tokenizer.vocab_size).name, "vocab_size": tokenizer.vocab_size,
            "tokenizer_fingerprint": tokenizer.fingerprint, "documents": len(docs), "settings": settings,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenizedCorpus(out_dir, tokenizer, meta)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished build into place; if another process won the race, keep its copy."""
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if not (out_dir / "meta.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)

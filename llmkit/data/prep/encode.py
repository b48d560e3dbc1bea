"""Tokenizer and encoding across tasks: the tokens of each split are cut into the same fixed-size shards whatever
the number of tasks, because shards are cut from the split's whole token stream, not from a task's share of it.

    train_tokenizer_unit  one unit: train on the first `tokenizer_train_chars` characters of every component's
                          training split (or load the given model), save it to tokenizer/
    encode_range          per byte range of clean/{split}.jsonl (whole lines: a line belongs to the range holding its
                          first byte): token ids and per-document lengths, into .prep
    write_shard_unit      per shard: tokens [k * shard_tokens, (k + 1) * shard_tokens) of the split's stream, gathered
                          from the ranges that hold them, and the document starts among them

`build_manifest` lists the shards' entries, in order, with the counts and the cleaning reports: it holds nothing about
how or when the dataset was prepared, so it is byte-identical for any number of tasks.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.data.encode import _encoded_chunks
from llmkit.data.files import atomic_open, save_array_atomic
from llmkit.data.prep import layout
from llmkit.data.shards import MANIFEST_FORMAT, VERSION, token_dtype, write_shard
from llmkit.data.sources import Document
from llmkit.data.spec import DataSpec
from llmkit.text.tokenizer import Tokenizer, load_pretrained_tokenizer, load_tokenizer, train_tokenizer

RANGE_BYTES = (64 << 10, 64 << 20)  # an encoding unit reads between 64 KiB and 64 MiB of clean/{split}.jsonl


def read_clean(work: Path, name: str, split: str) -> Iterator[Document]:
    with open(layout.clean_path(work, name, split), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            yield record["name"], record["text"]


def train_tokenizer_unit(spec: DataSpec, work: str) -> dict[str, Any]:
    if spec.tokenizer_path:
        tokenizer = load_pretrained_tokenizer(spec.tokenizer_path)
    else:
        tokenizer = train_tokenizer(spec.tokenizer, _training_texts(spec, Path(work)), spec.vocab_size, **spec.tokenizer_options)
    token_dtype(tokenizer.vocab_size, spec.dtype)  # fail before encoding if ids cannot be stored
    final = Path(work) / layout.TOKENIZER_DIR
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a killed earlier attempt may have renamed its copy already
    tmp.rename(final)
    return {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint}


def _training_texts(spec: DataSpec, work: Path) -> Iterator[str]:
    budget = spec.tokenizer_train_chars
    for name in sorted(spec.components):
        for _, text in read_clean(work, name, "train"):
            if budget <= 0:
                return
            yield text[:budget]
            budget -= len(text)


# ---- encoding ---------------------------------------------------------------------------------------------------
def encode_ranges(size: int, tasks: int) -> list[tuple[int, int]]:
    """Byte ranges covering a file of `size` bytes: enough for every task, none above RANGE_BYTES[1]."""
    low, high = RANGE_BYTES
    count = max(math.ceil(size / high), min(tasks, math.ceil(size / low)), 1)
    bounds = [size * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def range_key(component: str, split: str, start: int, end: int) -> str:
    return f"{component}/{split}/{start:013d}-{end:013d}"


def tokens_path(work: Path, key: str) -> Path:
    component, rest = key.split("/", 1)
    return layout.prep(work, component) / "tokens" / f"{rest}.bin"


def encode_range(
    work: str, component: str, split: str, start: int, end: int, dtype: str, processes: int, threads: int | None
) -> dict[str, Any]:
    tokenizer = _tokenizer(str(Path(work) / layout.TOKENIZER_DIR), threads)
    out = tokens_path(Path(work), range_key(component, split, start, end))
    lengths: list[np.ndarray] = []
    with atomic_open(out, "wb") as f:
        docs = _lines_in_range(layout.clean_path(Path(work), component, split), start, end)
        for flat, lens in _encoded_chunks(docs, tokenizer, processes, 1 << 20):
            f.write(flat.astype(dtype).tobytes())
            lengths.append(lens)
    lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    save_array_atomic(out.with_suffix(".len.npy"), lens)
    return {"tokens": int(lens.sum()), "documents": len(lens)}


def _tokenizer(directory: str, threads: int | None) -> Tokenizer:
    """Loaded once per task process, not once per unit (and again if the directory was rewritten since)."""
    stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(Path(directory).iterdir()))
    return _load_tokenizer(directory, stamp, threads)


@functools.lru_cache(maxsize=2)
def _load_tokenizer(directory: str, stamp: tuple, threads: int | None) -> Tokenizer:
    tokenizer = load_tokenizer(directory)
    if threads is not None and hasattr(tokenizer, "encode_threads"):
        tokenizer.encode_threads = threads
    return tokenizer


def _lines_in_range(path: Path, start: int, end: int) -> Iterator[Document]:
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the rest of a line that began in the previous range
        while f.tell() < end and (line := f.readline()):
            record = json.loads(line)
            yield record["name"], record["text"]


# ---- shards -----------------------------------------------------------------------------------------------------
def shard_plan(ranges: list[tuple[str, dict[str, Any]]], shard_tokens: int) -> list[tuple[int, int, list[tuple[str, int, int]]]]:
    """Per shard: [lo, hi) in the split's token stream and the (range key, first token, tokens) it reads from."""
    offsets = np.cumsum([0] + [r["tokens"] for _, r in ranges])
    total = int(offsets[-1])
    plan = []
    for lo in range(0, total, shard_tokens):
        hi = min(lo + shard_tokens, total)
        sources = [(key, int(offsets[i]), r["tokens"]) for i, (key, r) in enumerate(ranges)
                   if offsets[i] < hi and offsets[i + 1] > lo]
        plan.append((lo, hi, sources))
    return plan


def write_shard_unit(
    work: str, component: str, split: str, index: int, lo: int, hi: int, sources: list[tuple[str, int, int]], dtype: str
) -> dict[str, Any]:
    tokens, starts = [], []
    for key, offset, count in sources:
        path = tokens_path(Path(work), key)
        ids = np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)
        tokens.append(np.asarray(ids[max(lo - offset, 0) : min(hi - offset, count)]))
        lengths = np.load(path.with_suffix(".len.npy"))
        doc_starts = offset + np.cumsum(lengths) - lengths
        starts.append(doc_starts[(doc_starts >= lo) & (doc_starts < hi)] - lo)
    path = Path(work) / component / f"{split}_{index:05d}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = write_shard(path, np.concatenate(tokens).astype(dtype), np.concatenate(starts).astype(np.uint64))
    return entry | {"file": f"{component}/{entry['file']}"}


def build_manifest(
    spec: DataSpec, tokenizer: dict[str, Any], splits: dict[str, dict[str, Any]], reports: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """`splits`: component -> split -> {"tokens", "documents", "shards"}."""
    components = {
        name: {"weight": float(spec.components[name].get("weight", 1.0)), "splits": splits[name], "cleaning": reports[name]}
        for name in sorted(spec.components)
    }
    return {
        "format": MANIFEST_FORMAT, "version": VERSION, "dtype": token_dtype(tokenizer["vocab_size"], spec.dtype).name,
        "vocab_size": tokenizer["vocab_size"], "tokenizer_fingerprint": tokenizer["fingerprint"],
        "tokenizer_dir": layout.TOKENIZER_DIR, "components": components, "spec": asdict(spec),
        "fingerprint": spec.fingerprint(),
    }

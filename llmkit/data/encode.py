"""Encoding: documents -> token ids -> fixed-size shards, in parallel processes.

Documents are encoded in chunks by a pool of worker processes (each holds its own copy of the
tokenizer) and written in their original order by the parent, so the shards do not depend on the
number of processes. Each document ends with EOS (or, for tokenizers without one, a blank line).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.data.shards import write_shard
from llmkit.data.sources import Document
from llmkit.text.tokenizer import Tokenizer

_tokenizer: Tokenizer | None = None  # set in each worker process by _init_worker


class ShardWriter:
    """Appends documents and writes a shard every `shard_tokens` tokens; a document that crosses
    the boundary continues in the next shard (only document starts are recorded)."""

    def __init__(self, directory: Path, prefix: str, dtype: np.dtype, shard_tokens: int) -> None:
        if shard_tokens < 1:
            raise ValueError(f"data.shard_tokens must be >= 1, got {shard_tokens}")
        self.directory, self.prefix, self.dtype, self.shard_tokens = directory, prefix, dtype, shard_tokens
        self.entries: list[dict[str, Any]] = []
        self._pending: list[np.ndarray] = []
        self._pending_starts: list[int] = []
        self._pending_tokens = 0
        self.documents = 0

    def add(self, ids: np.ndarray) -> None:
        self._pending_starts.append(self._pending_tokens)
        self._pending.append(ids)
        self._pending_tokens += len(ids)
        self.documents += 1
        if self._pending_tokens >= self.shard_tokens:
            self._flush(final=False)

    def close(self) -> list[dict[str, Any]]:
        self._flush(final=True)
        return self.entries

    def _flush(self, final: bool) -> None:
        tokens = np.concatenate(self._pending) if self._pending else np.zeros(0, self.dtype)
        starts = np.asarray(self._pending_starts, dtype=np.int64)
        while len(tokens) >= self.shard_tokens or (final and len(tokens)):
            n = min(self.shard_tokens, len(tokens))
            self._write(tokens[:n], starts[starts < n])
            tokens, starts = tokens[n:], starts[starts >= n] - n
        self._pending = [tokens] if len(tokens) else []
        self._pending_starts = starts.tolist()
        self._pending_tokens = len(tokens)

    def _write(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        path = self.directory / f"{self.prefix}_{len(self.entries):05d}.bin"
        self.entries.append(write_shard(path, tokens.astype(self.dtype, copy=False), starts.astype(np.uint64)))


def _init_worker(tokenizer: Tokenizer, threads: int | None = None) -> None:
    global _tokenizer
    _tokenizer = tokenizer
    if threads is not None and hasattr(tokenizer, "encode_threads"):
        tokenizer.encode_threads = threads  # processes, not threads inside each, share out the cores


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(all ids concatenated, per-document lengths): two arrays pickle far faster than lists of lists."""
    tokenizer = _tokenizer
    assert tokenizer is not None, "worker not initialised"
    encoded = _encode_batch(tokenizer, texts)
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def _encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    if tokenizer.eos_id is None:  # char-level: documents are separated by a blank line
        texts = [t + "\n\n" for t in texts]
    batch = getattr(tokenizer, "encode_batch", None)
    encoded = batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]
    if tokenizer.eos_id is not None:
        encoded = [ids + [tokenizer.eos_id] for ids in encoded]
    return encoded


def batched_by_chars(texts: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    """Groups of texts of about chunk_chars characters: big enough to amortise per-call (or
    inter-process) overhead, small enough to keep every worker busy and memory flat."""
    chunk: list[str] = []
    size = 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encode_to_shards(
    docs: Iterable[Document], tokenizer: Tokenizer, writer: ShardWriter, processes: int = 1,
    chunk_chars: int = 1 << 20, progress: Any = None,
) -> list[dict[str, Any]]:
    """Encode every document into `writer`'s shards; returns the shard manifest entries."""
    for flat, lengths in _encoded_chunks(docs, tokenizer, processes, chunk_chars):
        for ids in np.split(flat, np.cumsum(lengths)[:-1]):
            writer.add(ids)
        if progress is not None:
            progress.update(len(lengths))
    return writer.close()


def _encoded_chunks(
    docs: Iterable[Document], tokenizer: Tokenizer, processes: int, chunk_chars: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    chunks = batched_by_chars((text for _, text in docs), chunk_chars)
    if processes <= 1:  # in this process, with the tokenizer's own threading
        _init_worker(tokenizer)
        yield from map(_encode_chunk, chunks)
        return
    # spawn, not fork: the parent may hold torch/OpenMP threads that a forked child inherits broken
    with mp.get_context("spawn").Pool(processes, initializer=_init_worker, initargs=(tokenizer, 1)) as pool:
        yield from pool.imap(_encode_chunk, chunks)

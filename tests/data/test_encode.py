"""Encoding into shards: fixed shard sizes, document boundaries, and no dependence on process count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmkit.data.encode import ShardWriter, encode_to_shards
from llmkit.data.shards import Shard
from llmkit.text.tokenizer import CharTokenizer, train_tokenizer

DOCS = [(f"d{i}", f"document number {i}: " + "lorem ipsum dolor " * (i % 7 + 1)) for i in range(300)]


def _read(directory: Path, entries: list[dict]) -> tuple[np.ndarray, list[int]]:
    tokens, starts, offset = [], [], 0
    for entry in entries:
        shard = Shard.open(directory / entry["file"], entry)
        tokens.append(np.asarray(shard.tokens))
        starts += [offset + int(s) for s in shard.doc_starts]
        offset += len(shard.tokens)
    return np.concatenate(tokens), starts


def test_shards_have_the_fixed_size_and_record_document_starts(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), shard_tokens=10)
    for n in (4, 9, 3, 15, 1):
        writer.add(np.full(n, n, dtype=np.uint16))
    entries = writer.close()
    assert [e["tokens"] for e in entries] == [10, 10, 10, 2]  # 32 tokens; only the last shard is short
    tokens, starts = _read(tmp_path, entries)
    assert starts == [0, 4, 13, 16, 31] and writer.documents == 5
    assert tokens.tolist() == [4] * 4 + [9] * 9 + [3] * 3 + [15] * 15 + [1]
    assert [e["documents"] for e in entries] == [2, 2, 0, 1]  # the 15-token document spans shards 2 and 3
    assert [e["file"] for e in entries] == [f"train_{i:05d}.bin" for i in range(4)]


def test_encoded_documents_end_with_eos_and_decode_back(tmp_path: Path) -> None:
    tokenizer = train_tokenizer("bpe", [t for _, t in DOCS], 300)
    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), 1000)
    entries = encode_to_shards(DOCS[:20], tokenizer, writer, processes=1, chunk_chars=300)
    tokens, starts = _read(tmp_path, entries)
    bounds = starts + [len(tokens)]
    for (_, text), lo, hi in zip(DOCS[:20], bounds[:-1], bounds[1:], strict=True):
        assert tokens[hi - 1] == tokenizer.eos_id
        assert tokenizer.decode(tokens[lo : hi - 1].tolist()) == text


def test_char_documents_are_separated_by_a_blank_line(tmp_path: Path) -> None:
    tokenizer = CharTokenizer.train(["ab\n"])
    writer = ShardWriter(tmp_path, "val", np.dtype(np.uint16), 100)
    tokens, _ = _read(tmp_path, encode_to_shards([("x", "ab"), ("y", "ba")], tokenizer, writer))
    assert tokenizer.decode(tokens.tolist()) == "ab\n\nba\n\n"


@pytest.mark.slow
def test_two_processes_write_the_same_shards_as_one(tmp_path: Path) -> None:
    tokenizer = train_tokenizer("bpe", [t for _, t in DOCS], 300)
    checksums = []
    for processes in (1, 2):
        out = tmp_path / str(processes)
        out.mkdir()
        writer = ShardWriter(out, "train", np.dtype(np.uint16), 2000)
        entries = encode_to_shards(DOCS, tokenizer, writer, processes=processes, chunk_chars=2000)
        checksums.append([e["sha256"] for e in entries])
    assert len(checksums[0]) > 3 and checksums[0] == checksums[1]


def test_shard_size_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shard_tokens must be >= 1"):
        ShardWriter(tmp_path, "train", np.dtype(np.uint16), 0)

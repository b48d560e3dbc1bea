"""Shard format: round trip, dtype choice, and every damaged-file error names the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmkit.data.shards import HEADER_BYTES, Shard, ShardError, token_dtype, verify_checksums, write_shard


def _write(tmp_path: Path, tokens: np.ndarray, starts=(0, 3)) -> tuple[Path, dict]:
    path = tmp_path / "train_00000.bin"
    return path, write_shard(path, tokens, np.asarray(starts, np.uint64))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_round_trip(tmp_path: Path, dtype) -> None:
    tokens = np.array([5, 1, 65535, 7, 0, 9], dtype=dtype)
    path, entry = _write(tmp_path, tokens)
    shard = Shard.open(path, entry, np.dtype(dtype))
    assert shard.tokens.dtype == np.dtype(dtype) and shard.tokens.tolist() == tokens.tolist()
    assert shard.doc_starts.tolist() == [0, 3]
    assert entry["bytes"] == path.stat().st_size == HEADER_BYTES + 16 + tokens.nbytes
    assert (entry["tokens"], entry["documents"]) == (6, 2)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


@pytest.mark.parametrize(
    ("vocab", "requested", "expected"),
    [(256, "auto", np.uint16), (65536, "auto", np.uint16), (65537, "auto", np.uint32), (300, "uint32", np.uint32)],
)
def test_token_dtype_fits_the_vocabulary(vocab: int, requested: str, expected) -> None:
    assert token_dtype(vocab, requested) == np.dtype(expected)


def test_vocabulary_too_large_for_the_requested_dtype() -> None:
    with pytest.raises(ValueError, match="does not fit in uint16.*data.dtype=uint32"):
        token_dtype(100_000, "uint16")
    with pytest.raises(ValueError, match="does not fit in uint32"):
        token_dtype(2**32 + 1)
    with pytest.raises(ValueError, match="unknown data.dtype 'int8'"):
        token_dtype(100, "int8")


def test_truncated_shard_names_the_file(tmp_path: Path) -> None:
    path, entry = _write(tmp_path, np.arange(100, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardError, match=f"{path}.*truncated"):
        Shard.open(path, entry)


def test_shorter_than_header_and_missing(tmp_path: Path) -> None:
    path, entry = _write(tmp_path, np.arange(10, dtype=np.uint16))
    path.write_bytes(b"LLMK")
    with pytest.raises(ShardError, match="shorter than its header"):
        Shard.open(path, entry)
    path.unlink()
    with pytest.raises(ShardError, match=f"{path} is missing"):
        Shard.open(path, entry)


def test_foreign_file_and_newer_version(tmp_path: Path) -> None:
    path, entry = _write(tmp_path, np.arange(10, dtype=np.uint16))
    data = bytearray(path.read_bytes())
    path.write_bytes(b"NOTSHARD" + bytes(data[8:]))
    with pytest.raises(ShardError, match="not an llmkit shard"):
        Shard.open(path)
    data[8] = 9  # version
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="format version 9"):
        Shard.open(path)


def test_manifest_mismatch(tmp_path: Path) -> None:
    path, entry = _write(tmp_path, np.arange(10, dtype=np.uint16))
    with pytest.raises(ShardError, match="does not match the manifest"):
        Shard.open(path, {**entry, "tokens": 11})
    with pytest.raises(ShardError, match="holds uint16 tokens; the manifest says uint32"):
        Shard.open(path, entry, np.dtype(np.uint32))


def test_checksum_mismatch_names_the_file(tmp_path: Path) -> None:
    path, entry = _write(tmp_path, np.arange(1000, dtype=np.uint16))
    verify_checksums(tmp_path, [entry])  # intact: passes
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte: only the checksum can tell
    path.write_bytes(bytes(data))
    Shard.open(path, entry)  # the header still looks fine
    with pytest.raises(ShardError, match=f"checksum mismatch for shard {path}"):
        verify_checksums(tmp_path, [entry])


def test_interrupted_write_leaves_no_shard(tmp_path: Path, monkeypatch) -> None:
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llmkit.data.shards.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path, np.arange(10, dtype=np.uint16))
    assert not (tmp_path / "train_00000.bin").exists()


def test_verified_shards_are_not_hashed_again_until_they_change(tmp_path: Path, monkeypatch) -> None:
    path, entry = _write(tmp_path, np.arange(1000, dtype=np.uint16))
    verify_checksums(tmp_path, [entry])

    def no_hashing(*args, **kwargs):
        raise AssertionError("hashed again")

    monkeypatch.setattr("llmkit.data.shards.sha256_file", no_hashing)
    verify_checksums(tmp_path, [entry])  # size and mtime unchanged: trusted
    monkeypatch.undo()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))  # same size, new mtime
    with pytest.raises(ShardError, match="checksum mismatch"):
        verify_checksums(tmp_path, [entry])

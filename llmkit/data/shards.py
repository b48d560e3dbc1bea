"""Token shards: the on-disk format every prepared dataset uses, and the manifest that lists them.

A shard is one file:

    header   64 bytes: magic b"LLMKSHRD", format version (u32), token itemsize (u32: 2 = uint16,
             4 = uint32), token count (u64), document-start count (u64), zero padding
    starts   u64 x document-start count: offsets in this shard where a document begins (a shard
             holds a fixed number of tokens, so its first document may have begun in the previous one)
    tokens   itemsize x token count, little endian

A shard is written to a temporary name and renamed, and the manifest is written last, so an
interrupted write never leaves a shard, or a dataset, that looks complete. Reading checks the
header against the manifest and, when asked, the SHA-256 of every file, naming the file that
does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.data.files import fault_point, sha256_file, temporary_name, write_json_atomic

MAGIC = b"LLMKSHRD"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, itemsize, tokens, document starts
HEADER_BYTES = 64
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "llmkit-shards"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class ShardError(ValueError):
    """A shard or manifest that is damaged or does not belong to this dataset."""


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32; a requested dtype too small fails."""
    if requested not in ("auto", *DTYPES):
        raise ValueError(f"unknown data.dtype '{requested}'; valid: auto, {', '.join(DTYPES)}")
    if vocab_size > 2**32:
        raise ValueError(f"a vocabulary of {vocab_size} tokens does not fit in uint32 shards")
    if requested == "auto":
        return DTYPES["uint16"] if vocab_size <= 2**16 else DTYPES["uint32"]
    dtype = DTYPES[requested]
    if vocab_size > np.iinfo(dtype).max + 1:
        raise ValueError(
            f"a vocabulary of {vocab_size} tokens does not fit in {requested} shards (at most "
            f"{np.iinfo(dtype).max + 1} ids); set data.dtype=uint32 or data.dtype=auto"
        )
    return dtype


def write_shard(path: Path, tokens: np.ndarray, doc_starts: np.ndarray) -> dict[str, Any]:
    """Write one shard atomically; returns its manifest entry (file, tokens, documents, bytes, sha256)."""
    header = HEADER.pack(MAGIC, VERSION, tokens.dtype.itemsize, len(tokens), len(doc_starts))
    little_endian = tokens.astype(tokens.dtype.newbyteorder("<"), copy=False)
    parts = [header.ljust(HEADER_BYTES, b"\0"), doc_starts.astype("<u8").tobytes(), little_endian.tobytes()]
    tmp = temporary_name(path)
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
                digest.update(part)
                f.flush()
                fault_point(path)  # a test may kill the process here: the header is written, the tokens are not
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {
        "file": path.name, "tokens": int(len(tokens)), "documents": int(len(doc_starts)),
        "bytes": sum(len(p) for p in parts), "sha256": digest.hexdigest(),
    }


@dataclass
class Shard:
    """A shard opened through a memory map: tokens and document starts are read lazily."""

    path: Path
    tokens: np.ndarray  # (n,) uint16 or uint32
    doc_starts: np.ndarray  # (d,) uint64 offsets into tokens

    @classmethod
    def open(cls, path: Path, entry: dict[str, Any] | None = None, dtype: np.dtype | None = None) -> "Shard":
        """Open and check the header (and, given its manifest entry, size and counts)."""
        size = path.stat().st_size if path.exists() else None
        if size is None:
            raise ShardError(f"shard {path} is missing; prepare the data again (llmkit prepare)")
        if size < HEADER_BYTES:
            raise ShardError(f"shard {path} is truncated ({size} bytes, shorter than its header)")
        with open(path, "rb") as f:
            magic, version, itemsize, n_tokens, n_starts = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise ShardError(f"{path} is not an llmkit shard (magic {magic!r})")
        if version != VERSION:
            raise ShardError(f"shard {path} has format version {version}; this llmkit reads version {VERSION}")
        expected = HEADER_BYTES + 8 * n_starts + itemsize * n_tokens
        if size != expected:
            raise ShardError(f"shard {path} is truncated or damaged: {size} bytes, its header says {expected}")
        if entry is not None and (entry["tokens"], entry["documents"]) != (n_tokens, n_starts):
            raise ShardError(f"shard {path} does not match the manifest's token or document count")
        token_type = np.dtype(f"<u{itemsize}")
        if dtype is not None and token_type != dtype:
            raise ShardError(f"shard {path} holds {token_type.name} tokens; the manifest says {dtype.name}")
        starts = _map(path, np.dtype("<u8"), HEADER_BYTES, n_starts)
        tokens = _map(path, token_type, HEADER_BYTES + 8 * n_starts, n_tokens)
        return cls(path, tokens, starts)


def _map(path: Path, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    if count == 0:  # a zero-length memory map is an error
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


# ---- manifest -------------------------------------------------------------------------------------
def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no prepared dataset in {directory} (no {MANIFEST}); run llmkit prepare")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShardError(f"{path} is not valid JSON ({err}); prepare the data again") from err
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ShardError(f"{path} is not an llmkit shard manifest")
    return manifest


VERIFIED = ".verified.json"  # shards already hashed, by (size, mtime): later start-ups and other ranks skip them


def verify_checksums(directory: Path, entries: list[dict[str, Any]]) -> None:
    """Check every shard's SHA-256 against the manifest; the first mismatch or missing file is named."""
    for entry, actual in failed_checksums(directory, entries):
        path = directory / entry["file"]
        if actual is None:
            raise ShardError(f"shard {path} is missing; prepare the data again (llmkit prepare)")
        found = f"{actual[:16]}..." if len(actual) == 64 else actual
        raise ShardError(
            f"checksum mismatch for shard {path}: expected {entry['sha256'][:16]}..., found {found}; "
            "the file is corrupt: delete the dataset directory and prepare the data again"
        )


def failed_checksums(directory: Path, entries: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str | None]]:
    """(entry, actual SHA-256 or None when missing) for every shard that does not match the manifest.

    A shard whose size and modification time match an earlier successful check is not read again (a
    terabyte of shards is hashed once, not at every start on every rank; any rewrite changes the mtime),
    and one of the wrong size is not hashed at all. The stamp file is read and written once per call."""
    verified = _read_verified(directory)
    failed: list[tuple[dict[str, Any], str | None]] = []
    changed = False
    for entry in entries:
        path = directory / entry["file"]
        stat = path.stat() if path.exists() else None
        if stat is None:
            failed.append((entry, None))
            continue
        stamp = [stat.st_size, stat.st_mtime_ns, entry["sha256"]]
        if verified.get(entry["file"]) == stamp:
            continue
        actual = sha256_file(path) if stat.st_size == entry["bytes"] else f"{stat.st_size} bytes, not {entry['bytes']}"
        if actual != entry["sha256"]:
            failed.append((entry, actual))
            continue
        verified[entry["file"]], changed = stamp, True
    if changed:
        try:
            write_json_atomic(directory / VERIFIED, verified)
        except OSError:  # a read-only dataset directory: verify again next time
            pass
    return failed


def _read_verified(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}


def data_fingerprint(manifest: dict[str, Any]) -> str:
    """Identifies the exact tokens a run trains on: the tokenizer and every shard's checksum."""
    digest = hashlib.sha256(manifest["tokenizer_fingerprint"].encode())
    for name in sorted(manifest["components"]):
        for split in sorted(manifest["components"][name]["splits"]):
            for entry in manifest["components"][name]["splits"][split]["shards"]:
                digest.update(entry["sha256"].encode())
    return digest.hexdigest()[:16]

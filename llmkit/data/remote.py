"""Prepared datasets at fsspec URLs (s3://, gs://, https://, ...) through a local cache.

`localize(url, cache_dir)` copies the manifest, the tokenizer and every shard the manifest lists
into cache_dir/remote/<hash of url>/, each file under a temporary name and renamed once its
checksum matches, and returns that directory. Files already cached with the right checksum are
not fetched again, so a second run (or a second rank on the node) reads only the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import fsspec

from llmkit.data.shards import MANIFEST, ShardError, read_manifest, sha256_file


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def cache_path(url: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / "remote" / hashlib.sha256(url.encode()).hexdigest()[:16]


def localize(url: str, cache_dir: Path) -> Path:
    fs, root = fsspec.core.url_to_fs(url)
    local = cache_path(url, cache_dir)
    local.mkdir(parents=True, exist_ok=True)
    remote_manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    tokenizer_dir = remote_manifest["tokenizer_dir"]
    for path in fs.find(f"{root}/{tokenizer_dir}"):
        relative = path[len(root.rstrip("/")) + 1 :]
        _fetch(fs, path, local / relative, expected_sha256=None)
    for component in remote_manifest["components"].values():
        for split in component["splits"].values():
            for entry in split["shards"]:
                _fetch(fs, f"{root}/{entry['file']}", local / entry["file"], entry["sha256"])
    _write_bytes(local / MANIFEST, json.dumps(remote_manifest, indent=2).encode())  # last: the copy is complete
    read_manifest(local)  # fails now, not at training time, if the copy is not a dataset
    return local


def _fetch(fs: fsspec.AbstractFileSystem, remote: str, local: Path, expected_sha256: str | None) -> None:
    if local.exists() and (expected_sha256 is None or sha256_file(local) == expected_sha256):
        return
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
    fs.get_file(remote, str(tmp))
    if expected_sha256 is not None and sha256_file(tmp) != expected_sha256:
        tmp.unlink()
        raise ShardError(f"checksum mismatch for {remote} after download: the remote shard is corrupt")
    os.replace(tmp, local)


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

"""Prepared datasets at fsspec URLs (s3://, gs://, https://, ...) through a local cache.

`localize(url, cache_dir)` copies the manifest, the tokenizer and every shard the manifest lists
into cache_dir/remote/<hash of url>/, each file under a temporary name and renamed once its
checksum matches, and returns that directory. Shards already cached with the right checksum are
not fetched again, and are hashed only once (llmkit/data/shards.py stamps what it verified), so a
second run, or a second node on a shared cache, reads little more than the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import fsspec

from llmkit.data.files import sha256_file, write_json_atomic
from llmkit.data.shards import MANIFEST, ShardError, failed_checksums, read_manifest


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def cache_path(url: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / "remote" / hashlib.sha256(url.encode()).hexdigest()[:16]


def localize(url: str, cache_dir: Path) -> Path:
    fs, root = fsspec.core.url_to_fs(url)
    local = cache_path(url, cache_dir)
    local.mkdir(parents=True, exist_ok=True)
    remote_manifest = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    changed = _cached_manifest(local) != remote_manifest  # a new version at the same URL: refresh the tokenizer too
    for path in fs.find(f"{root}/{remote_manifest['tokenizer_dir']}"):
        target = local / path[len(root.rstrip("/")) + 1 :]
        if changed or not target.exists():
            _download(fs, path, target, expected_sha256=None)
    entries = [e for c in remote_manifest["components"].values() for split in c["splits"].values() for e in split["shards"]]
    for entry, _ in failed_checksums(local, entries):  # missing or damaged here: fetch (again)
        _download(fs, f"{root}/{entry['file']}", local / entry["file"], entry["sha256"])
    write_json_atomic(local / MANIFEST, remote_manifest)  # last: the copy is complete
    read_manifest(local)  # fails now, not at training time, if the copy is not a dataset
    return local


def _cached_manifest(local: Path) -> dict | None:
    try:
        return json.loads((local / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _download(fs: fsspec.AbstractFileSystem, remote: str, local: Path, expected_sha256: str | None) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
    fs.get_file(remote, str(tmp))
    if expected_sha256 is not None and sha256_file(tmp) != expected_sha256:
        tmp.unlink()
        raise ShardError(f"checksum mismatch for {remote} after download: the remote shard is corrupt")
    os.replace(tmp, local)

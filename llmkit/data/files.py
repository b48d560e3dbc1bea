"""Small file helpers the data stages share: atomic writes, file checksums, and a fault-injection hook for tests.

Every file a preparation stage produces is written under a temporary name and renamed when complete, so a process
killed at any point leaves either the old state or the new one, never a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

# Test hook: a process writing a file whose path matches $LLMKIT_PREPARE_KILL (a glob) kills itself with SIGKILL
# half-way through the write, once: it first creates the file $LLMKIT_PREPARE_KILL_ONCE, and does nothing while that
# exists. tests/data and tests/slurm use it to kill a preparation task mid-write; unset, it costs one lookup per file.
KILL_PATTERN, KILL_ONCE = "LLMKIT_PREPARE_KILL", "LLMKIT_PREPARE_KILL_ONCE"


def fault_point(path: Path) -> None:
    pattern = os.environ.get(KILL_PATTERN)
    if not pattern or not fnmatch.fnmatch(str(path), pattern):
        return
    once = Path(os.environ.get(KILL_ONCE, f"{path}.killed"))
    try:
        once.touch(exist_ok=False)
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path`, per process: several processes may write the same file (a retried task)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it is fsynced and renamed to `path`, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """open(path, mode) under a temporary name; renamed to `path` when the block ends without an error."""
    with atomic_path(path) as tmp:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            fault_point(path)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Readers never see half a file."""
    with atomic_open(Path(path)) as f:
        f.write(json.dumps(payload, indent=2, ensure_ascii=False))


def save_array_atomic(path: Path, array: np.ndarray) -> None:
    """np.save, atomically (np.load(path, mmap_mode="r") reads it back without copying)."""
    with atomic_open(Path(path), "wb") as f:
        np.save(f, np.ascontiguousarray(array))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()

"""Checkpoints that survive crashes: atomic single-file writes, and `resume=auto`.

A checkpoint file is written to `<name>.tmp` and renamed into place, so a crash while saving
leaves the previous checkpoint untouched and never a half-written file under the real name;
sharded checkpoint directories likewise (see llmkit.distributed.FSDP2Strategy).
`find_resume_checkpoint` picks the newest complete checkpoint of a run directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)  # atomic on POSIX file systems


def replace_directory(new: Path, path: Path) -> None:
    """Put the finished directory `new` at `path`. Two renames, so a crash between them leaves
    the previous checkpoint as `<name>.old` (still found by find_resume_checkpoint), never damaged."""
    old = path.with_name(path.name + OLD_SUFFIX)
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        path.rename(old)
    new.rename(path)
    if old.exists():
        shutil.rmtree(old)


def is_complete(path: Path) -> bool:
    """A file not named *.tmp, or a sharded checkpoint directory holding its metadata."""
    if path.name.endswith(TMP_SUFFIX):
        return False
    if path.is_dir():
        return (path / ".metadata").exists() and (path / "meta.pt").exists()
    return path.is_file() and path.stat().st_size > 0


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The most recently written complete checkpoint under run_dir (any depth), or None."""
    found = [*Path(run_dir).rglob("*.ckpt"), *Path(run_dir).rglob("*.ckpt" + OLD_SUFFIX)]
    candidates = [p for p in found if is_complete(p)]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)

"""Checkpoints that survive crashes: atomic single-file writes, and `resume=auto`.

A checkpoint file is written to `<name>.tmp` and renamed into place, so a crash while saving
leaves the previous checkpoint untouched and never a half-written file under the real name.
`find_resume_checkpoint` picks the newest complete checkpoint of a run directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

TMP_SUFFIX = ".tmp"


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)  # atomic on POSIX file systems


def is_complete(path: Path) -> bool:
    """A file not named *.tmp, or a sharded checkpoint directory holding its metadata."""
    if path.name.endswith(TMP_SUFFIX):
        return False
    if path.is_dir():
        return (path / ".metadata").exists() and (path / "meta.pt").exists()
    return path.is_file() and path.stat().st_size > 0


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The most recently written complete checkpoint under run_dir (any depth), or None."""
    candidates = [p for p in Path(run_dir).rglob("*.ckpt") if is_complete(p)]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)

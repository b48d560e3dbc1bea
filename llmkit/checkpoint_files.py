"""How checkpoints are named on disk so that a crash never damages one: `<name>.tmp` while a file is
written, `<name>.old` while a sharded directory is swapped, and which of them `resume=auto` may pick.
Plain files and directories only: the Lightning checkpoint IO (llmkit/lit/checkpointing.py) and the
distributed strategies (llmkit/distributed.py) both build on this, neither on the other."""

from __future__ import annotations

import shutil
from pathlib import Path

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


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

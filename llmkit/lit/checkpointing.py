"""Checkpoints that survive crashes: atomic single-file writes, and `resume=auto`.

A checkpoint file is written to `<name>.tmp` and renamed into place, so a crash while saving
leaves the previous checkpoint untouched and never a half-written file under the real name;
sharded checkpoint directories likewise (see llmkit.distributed.FSDP2Strategy).
`find_resume_checkpoint` (llmkit/checkpoint_files.py) picks the newest complete checkpoint of a run directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from llmkit.checkpoint_files import TMP_SUFFIX


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)  # atomic on POSIX file systems

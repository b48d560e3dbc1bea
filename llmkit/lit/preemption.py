"""Preemption and time limits on SLURM: checkpoint at a step boundary, requeue, stop.

SLURM sends a signal before it kills a job (`#SBATCH --signal=USR1@120`; also on preemption
with a grace time). The handler only sets a flag; the checkpoint is written at the next optimizer
step boundary, where model, optimizer and data position are consistent, so the requeued job
(run with `resume=auto` in the same run directory) continues exactly where this one stopped.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    def __init__(self, dirpath: str, signal_name: str = "SIGUSR1", requeue: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.signum = getattr(signal, signal_name)
        self.requeue = requeue
        self.received = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = True  # act at the next step boundary, not in the middle of one

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # every rank must agree, or one rank would wait for the others in a collective forever
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        path = self.dirpath / "preempted.ckpt"
        trainer.save_checkpoint(path)
        log.warning(f"signal received: saved {path} at step {trainer.global_step}")
        trainer.should_stop = True
        if self.requeue and trainer.is_global_zero:
            requeue_slurm_job()


def requeue_slurm_job() -> None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
    if job is None:
        log.warning("not a SLURM job: nothing to requeue")
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        log.warning(f"requeued SLURM job {job}")
    else:
        log.error(f"could not requeue SLURM job {job}: {result.stderr.strip()}")

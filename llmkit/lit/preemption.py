"""Preemption and time limits on SLURM: checkpoint at a step boundary, requeue, stop.

SLURM sends a signal before it kills a job (`#SBATCH --signal=USR1@120`; also on preemption
with a grace time). The handler only sets a flag; the checkpoint is written at an optimizer
step boundary, where model, optimizer and data position are consistent, so the requeued job
(run with `resume=auto` in the same run directory) continues exactly where this one stopped.

With several ranks every rank must stop at the same step, or one would wait for the others in a
collective forever, so the ranks share their flags with an all-reduce. It is started at one step
and read at the next: a blocking reduction at every step would make the host wait for the GPUs
to finish the step before it could queue the next one, leaving them idle meanwhile. The signal is
acted on one step later, at the same step on every rank.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    def __init__(self, dirpath: str, signal_name: str = "SIGUSR1", requeue: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.signum = getattr(signal, signal_name)
        self.requeue = requeue
        self.received = False
        self._last_step = -1
        self._pending: tuple[Any, torch.Tensor] | None = None  # (all-reduce in flight, its flag)
        self._previous_handler: Any = None  # set while our handler is installed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._previous_handler = signal.signal(self.signum, self._on_signal)
        self._last_step = trainer.global_step

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = True  # act at a step boundary, not in the middle of one

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_step:  # still accumulating gradients: not a boundary
            return
        self._last_step = trainer.global_step
        if not self._all_agree_to_stop(trainer):
            return
        path = self.dirpath / "preempted.ckpt"
        trainer.save_checkpoint(path)
        log.warning(f"signal received: saved {path} at step {trainer.global_step}")
        trainer.should_stop = True
        if self.requeue and trainer.is_global_zero:
            requeue_slurm_job()

    def _all_agree_to_stop(self, trainer: L.Trainer) -> bool:
        """The flags of every rank as of the previous step (any rank's signal counts); this rank's own
        flag when it runs alone."""
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return self.received
        stop = self._finish_pending()
        flag = torch.tensor([int(self.received)], device=trainer.strategy.root_device)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)
        return stop

    def _finish_pending(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return bool(flag.item())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish_pending()  # no collective left in flight when the process group goes away

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # also after a failure (on_train_end is not called then; nor may a dead rank's flag be awaited)
        if self._previous_handler is not None:
            signal.signal(self.signum, self._previous_handler)
            self._previous_handler = None


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

"""PreemptionCheckpoint: the signal stops training at an optimizer-step boundary, checkpointed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from llmkit.lit.module import LitLM
from llmkit.lit.preemption import PreemptionCheckpoint

MODEL = dict(vocab_size=37, d_model=32, n_layers=1, n_heads=4, max_seq_len=16)


class SignalDuringBatch(Callback):
    """Sends SIGUSR1 to this process at the start of one batch, as SLURM would before a time limit."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_signal_mid_accumulation_checkpoints_at_the_next_optimizer_step(tmp_path: Path) -> None:
    lit = LitLM(model=MODEL, optim={"name": "adamw"}, scheduler={"name": "constant"})
    tokens = torch.randint(0, 37, (40, 17), generator=torch.Generator().manual_seed(0))
    batches = DataLoader([(row[:-1], row[1:]) for row in tokens], batch_size=2)
    preemption = PreemptionCheckpoint(str(tmp_path), requeue=False)
    before = signal.getsignal(signal.SIGUSR1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=10, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[SignalDuringBatch(4), preemption],
    )
    trainer.fit(lit, train_dataloaders=batches)
    # batch 4 is the first micro-batch of step 3: the checkpoint waits for its second one
    saved = torch.load(tmp_path / "preempted.ckpt", weights_only=True)
    assert saved["global_step"] == trainer.global_step == 3
    assert signal.getsignal(signal.SIGUSR1) == before, "the previous handler is back after training"

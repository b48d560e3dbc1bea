"""Callbacks: throughput, step time and MFU."""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class ThroughputMonitor(Callback):
    """Times whole optimizer steps (data loading included, validation excluded) and logs
    tokens/s, step time and model FLOPs utilisation against a configurable peak."""

    def __init__(self, peak_flops_per_device: float | None = None, warmup_steps: int = 5, window: int = 20) -> None:
        self.peak_flops_per_device = peak_flops_per_device
        self.warmup_steps = warmup_steps  # first steps (compilation, allocator warm-up) are not steady state
        self.window = window
        self.step_times: list[float] = []  # seconds per optimizer step, steady state only
        self.tokens_seen = 0
        self._last_end: float | None = None
        self._last_step = -1
        self._step_tokens = 0
        self._flops_per_token = 0
        self.first_step_unix_time: float | None = None  # lets a launcher measure start-up time

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flops_per_token = pl_module.model.flops_per_token(trainer.datamodule.seq_len)
        self._last_step = trainer.global_step
        self.tokens_seen = trainer.global_step * self._tokens_per_step_estimate(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.first_step_unix_time is None:
            self.first_step_unix_time = time.time()

    @staticmethod
    def _tokens_per_step_estimate(trainer: L.Trainer) -> int:
        dm = trainer.datamodule
        return dm.batch_size * dm.seq_len * trainer.accumulate_grad_batches * trainer.world_size

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._step_tokens += batch_tokens(batch) * trainer.world_size
        if trainer.global_step == self._last_step:  # still accumulating gradients
            return
        now = time.perf_counter()
        steps_done = trainer.global_step - self._last_step
        self._last_step = trainer.global_step
        self.tokens_seen += self._step_tokens
        if self._last_end is not None and trainer.global_step > self.warmup_steps:
            self.step_times.append((now - self._last_end) / steps_done)
            if trainer.global_step % trainer.log_every_n_steps == 0:
                self._log(pl_module, self._step_tokens)
        self._last_end = now
        self._step_tokens = 0

    def _log(self, pl_module: L.LightningModule, step_tokens: int) -> None:
        recent = statistics.median(self.step_times[-self.window :])
        tokens_per_s = step_tokens / recent
        pl_module.log("perf/step_ms", recent * 1000)
        pl_module.log("perf/tokens_per_s", tokens_per_s, prog_bar=True)
        mfu = self.mfu(tokens_per_s, pl_module.trainer.world_size)
        if mfu is not None:
            pl_module.log("perf/mfu", mfu)

    def mfu(self, tokens_per_s: float, world_size: int) -> float | None:
        if not self.peak_flops_per_device:
            return None
        return tokens_per_s * self._flops_per_token / (self.peak_flops_per_device * world_size)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None  # the next interval would include validation

    def summary(self, tokens_per_step: int, world_size: int) -> dict[str, float | None]:
        if not self.step_times:
            return {"median_step_ms": None, "tokens_per_s": None, "mfu": None}
        median = statistics.median(self.step_times)
        tokens_per_s = tokens_per_step / median
        return {"median_step_ms": median * 1000, "tokens_per_s": tokens_per_s, "mfu": self.mfu(tokens_per_s, world_size)}


def batch_tokens(batch: Any) -> int:
    """Input tokens of a batch: pre-training's (inputs, targets, ...) tuple, or a post-training dict
    whose *ids tensors are the rows (chosen and rejected rows both count)."""
    if isinstance(batch, dict):
        return sum(v.numel() for k, v in batch.items() if k.endswith("ids"))
    return batch[0].numel()

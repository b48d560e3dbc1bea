"""The LightningModule: builds the model in `configure_model`, asks it for its loss, logs.

It knows nothing about architectures: the model owns its loss (auxiliary losses included), and
parallelism is applied from outside by `llmkit.distributed` when the strategy asks for it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from llmkit.distributed import apply_compile, apply_fsdp
from llmkit.lit.optim import OPTIMIZERS, SCHEDULES
from llmkit.model import ModelConfig, Transformer
from llmkit.recompute import apply_activation_checkpointing


class LitLM(L.LightningModule):
    def __init__(
        self, model: dict[str, Any], optim: dict[str, Any], scheduler: dict[str, Any], compile: bool = False,
        activation_checkpointing: str = "none",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: Transformer | None = None
        self.val_loss = MeanMetric()

    # ---- construction ----------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        values = dict(self.hparams.model)
        if values.get("vocab_size") is None:  # taken from the data's tokenizer
            values["vocab_size"] = self.trainer.datamodule.vocab_size
        return ModelConfig.from_dict(values)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = Transformer(self.model_config())
        apply_activation_checkpointing(self.model, self.hparams.activation_checkpointing)
        if self.hparams.compile:
            apply_compile(self.model)
        if self.device_mesh is not None:
            options = getattr(self.trainer.strategy, "fsdp_options", {})  # FSDP2Strategy's; Lightning's has none
            apply_fsdp(self.model, self.device_mesh, self.trainer.precision, **options)

    def configure_optimizers(self) -> dict[str, Any]:
        optim = dict(self.hparams.optim)
        optimizer = OPTIMIZERS.build(optim.pop("name"), model=self.model, **optim)
        schedule = dict(self.hparams.scheduler)
        total_steps = self.trainer.max_steps
        if total_steps is None or total_steps < 0:
            raise ValueError("learning-rate schedules need trainer.max_steps=N (a positive number of optimizer steps)")
        multiplier = SCHEDULES.build(schedule.pop("name"), total_steps=total_steps, **schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, multiplier), "interval": "step"}}

    # ---- steps -----------------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        inputs, targets, *document = batch  # packed rows add (positions, segments)
        out = self.model.loss(inputs, targets, *document)
        self.log("train/loss", out.loss, prog_bar=True)
        for name, value in out.aux.items():
            self.log(f"train/aux/{name}", value)
        if self._logging_step():  # statistics the model reports, such as MoE expert load
            for name, value in out.metrics.items():
                self.log(f"train/{name}", value)
        return out.loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        inputs, targets, *document = batch  # packed rows add (positions, segments)
        out = self.model.loss(inputs, targets, *document)
        self.val_loss.update(out.ce, weight=targets.numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # token-weighted mean over every rank's batches
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", loss.exp(), prog_bar=True, sync_dist=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._logging_step():
            self.log("train/lr", optimizer.param_groups[0]["lr"])
            if not self._clips_by_norm():  # otherwise clipping computes (and logs) the norm anyway
                self.log("train/grad_norm", _full(torch.nn.utils.get_total_norm(_grads(optimizer))))

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by the global norm here rather than in Lightning's precision plugin: the norm is then
        computed once and logged as train/grad_norm, and fused AdamW works under bf16-mixed (the plugin
        refuses fused optimizers with clipping, a rule that protects fp16 loss scaling; bf16 has no
        scaler). With a gradient scaler the plugin's path, and its check, stay in charge."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if not self._clips_by_norm() or scaler is not None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        norm = torch.nn.utils.clip_grad_norm_(_params(optimizer), self.trainer.gradient_clip_val)
        if self._logging_step():
            self.log("train/grad_norm", _full(norm))  # before clipping

    def _clips_by_norm(self) -> bool:
        return bool(self.trainer.gradient_clip_val) and self.trainer.gradient_clip_algorithm in (None, "norm")

    def _logging_step(self) -> bool:
        """Whether Lightning writes this step's logs: it does when (step + 1) % log_every_n_steps == 0,
        and a value logged on another step would be written late, as if from this one."""
        return (self.global_step + 1) % self.trainer.log_every_n_steps == 0

    # ---- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model_config"] = self.model.cfg.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("model_config", {})
        if self.model is not None and saved.get("vocab_size") not in (None, self.model.cfg.vocab_size):
            raise ValueError(
                f"the checkpoint's model has a vocabulary of {saved['vocab_size']} tokens but this run's data "
                f"gives {self.model.cfg.vocab_size}; resume with the data and tokenizer the checkpoint was trained on"
            )


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for p in _params(optimizer) if p.grad is not None]


def _full(norm: torch.Tensor) -> torch.Tensor:
    """A norm over FSDP-sharded gradients is a DTensor; the logger wants the plain total."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

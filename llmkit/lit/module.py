"""The LightningModule: builds the model in `configure_model`, asks the task's objective for the loss, logs.

It knows nothing about architectures or tasks: the objective (llmkit/posttrain/objectives.py: lm,
sft, dpo, reward) turns a batch into a loss, the model owns its auxiliary losses, and what changes
the model from outside (LoRA, activation checkpointing, compile, FSDP) is applied here in that order.
A post-training run starts from `init_from`'s weights; with finetune=lora its checkpoints hold only
the adapters (and a reward head), and name the base they apply to.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from llmkit.distributed import apply_compile, apply_fsdp, shard_heads
from llmkit.lit.optim import OPTIMIZERS, SCHEDULES
from llmkit.model import ModelConfig, Transformer
from llmkit.posttrain import rl, rl_ppo  # noqa: F401  (register the online RL objectives grpo, rloo, ppo)
from llmkit.posttrain.objectives import ADAPTER_FINETUNES as ADAPTED  # finetune= values with adapter checkpoints
from llmkit.posttrain.objectives import OBJECTIVES
from llmkit.recompute import apply_activation_checkpointing

CHECKPOINT_KEYS = ("monitor", "monitor_mode")  # task keys that conf/callbacks/default.yaml reads, not the objective


class LitLM(L.LightningModule):
    def __init__(
        self, model: dict[str, Any], optim: dict[str, Any], scheduler: dict[str, Any], compile: bool = False,
        activation_checkpointing: str = "none", task: dict[str, Any] | None = None,
        finetune: dict[str, Any] | None = None, init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: Transformer | None = None
        task = dict(task or {"name": "lm"})
        for key in CHECKPOINT_KEYS:
            task.pop(key, None)
        self.objective = OBJECTIVES.build(task.pop("name"), **task)
        self.val_metrics = torch.nn.ModuleDict({_key(n): MeanMetric() for n in self.objective.val_names})
        self.finetune = dict(finetune or {"name": "full"})
        if self.finetune["name"] not in ("full", *ADAPTED):
            raise ValueError(f"finetune={self.finetune['name']}: valid values are full, lora and qlora")
        self.strict_loading = self.finetune["name"] not in ADAPTED  # adapter checkpoints hold only the adapters
        self._adapters: dict[str, Any] = {}  # what an adapter checkpoint records besides its base

    # ---- construction ----------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        values = dict(self.hparams.model)
        if values.get("vocab_size") is None:  # taken from the data's tokenizer
            values["vocab_size"] = self.trainer.datamodule.vocab_size
        return ModelConfig.from_dict(values)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        init_from = self.hparams.init_from
        self.model = self._base(init_from) if init_from else Transformer(self.model_config())
        self.objective.attach(self.model, init_from, self.finetune["name"])
        if self.finetune["name"] in ADAPTED:
            if not init_from:
                raise ValueError(f"finetune={self.finetune['name']} adapts a trained model: "
                                 "give init_from=<llmkit checkpoint | HF dir>")
            self._adapters = _apply_adapters(self.model, self.finetune)
        apply_activation_checkpointing(self.model, self.hparams.activation_checkpointing)
        if self.hparams.compile:
            apply_compile(self.model)
        if self.device_mesh is not None:
            options = getattr(self.trainer.strategy, "fsdp_options", {})  # FSDP2Strategy's; Lightning's has none
            apply_fsdp(self.model, self.device_mesh, self.trainer.precision, **options)
            shard_heads(self.objective, self.device_mesh, self.trainer.precision)

    def _base(self, init_from: str) -> Transformer:
        """The base model's weights; its tokenizer must be the one the data is encoded with."""
        from llmkit.checkpoint import load_base

        model, tokenizer = load_base(init_from)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        theirs = getattr(datamodule, "tokenizer", None)
        if theirs is None or theirs.fingerprint == tokenizer.fingerprint:
            return model
        if getattr(datamodule, "base_fingerprint", None) == tokenizer.fingerprint:  # data.add_template_tokens
            from llmkit.posttrain.base import resize_vocabulary

            if self.finetune["name"] in ADAPTED:
                raise ValueError("data.add_template_tokens=true needs finetune=full: with LoRA the new embedding rows "
                                 "would stay at their initial values and not be saved")
            return resize_vocabulary(model, theirs.vocab_size)
        raise ValueError(
            f"init_from={init_from} was trained with another tokenizer ({tokenizer.kind}, vocab {tokenizer.vocab_size}, "
            f"fingerprint {tokenizer.fingerprint}) than this run's data ({theirs.kind}, vocab {theirs.vocab_size}, "
            f"fingerprint {theirs.fingerprint}); prepare the data with the base model's tokenizer "
            "(data.tokenizer_path=, or data=sft / data=preference, which use init_from's)")

    def configure_optimizers(self) -> dict[str, Any]:
        optim = dict(self.hparams.optim)
        # over the whole module: the model's trainable parameters and the objective's (a reward head)
        optimizer = OPTIMIZERS.build(optim.pop("name"), model=self, **optim)
        schedule = dict(self.hparams.scheduler)
        total_steps = self.trainer.max_steps
        if total_steps is None or total_steps < 0:
            raise ValueError("learning-rate schedules need trainer.max_steps=N (a positive number of optimizer steps)")
        multiplier = SCHEDULES.build(schedule.pop("name"), total_steps=total_steps, **schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, multiplier), "interval": "step"}}

    # ---- steps -----------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.objective.on_fit_start(self)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        trainer = self._trainer
        scale = trainer.accumulate_grad_batches * trainer.world_size if trainer is not None else 1
        out = self.objective.training_loss(self.model, batch, scale)
        self.log("train/loss", out.logs["loss"], prog_bar=True)  # every step: the progress bar shows it
        if self._logging_step():  # each self.log costs ~1 ms of Lightning's bookkeeping: an RL step logs ~20
            for name, value in {**out.logs, **out.metrics}.items():  # metrics: what the model reports (MoE load)
                if name != "loss":
                    self.log(f"train/{name}", value)
        return out.loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        for name, (total, count) in self.objective.validation(self.model, batch).items():
            self.val_metrics[_key(name)].update(total / count.clamp(min=1), weight=count)

    def on_validation_epoch_end(self) -> None:
        for name in self.objective.val_names:
            metric = self.val_metrics[_key(name)]
            value = metric.compute()  # weighted mean over every rank's batches
            metric.reset()
            self.log(f"val/{name}", value, prog_bar=name == "loss", sync_dist=False)
            if name == "loss" and self.objective.perplexity:  # a token-mean cross-entropy
                self.log("val/ppl", value.exp(), prog_bar=True, sync_dist=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.objective.before_optimizer_step(self)  # first: the norm logged and clipped is of the final gradient
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
        and a value logged on another step would be written late, as if from this one. The last step
        logs too, so that callback_metrics (and what reads them) end with the final values."""
        trainer, step = self.trainer, self.global_step + 1
        return step % trainer.log_every_n_steps == 0 or step == trainer.max_steps

    # ---- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model_config"] = self.model.cfg.to_dict()
        template = getattr(self.trainer.datamodule, "template", None) if self._trainer is not None else None
        if template is not None:  # what llmkit serve renders chat requests with
            checkpoint["chat_template"] = template
        if self.finetune["name"] in ADAPTED:  # the adapters (and the objective's head), and which base they adapt
            from llmkit.adapters.lora import ADAPTER_PARAMS

            checkpoint["lora"] = {"base": str(self.hparams.init_from), **self._adapters}  # qlora: + "quant"
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if k.endswith(ADAPTER_PARAMS) or k.startswith("objective.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("model_config", {})
        if self.model is not None and saved.get("vocab_size") not in (None, self.model.cfg.vocab_size):
            raise ValueError(
                f"the checkpoint's model has a vocabulary of {saved['vocab_size']} tokens but this run's data "
                f"gives {self.model.cfg.vocab_size}; resume with the data and tokenizer the checkpoint was trained on"
            )


def _apply_adapters(model: Transformer, finetune: dict[str, Any]) -> dict[str, Any]:
    """LoRA (or QLoRA: the frozen base stored quantized, computed here once) on the model; returns what the
    checkpoints record so that loading rebuilds the same model (llmkit/checkpoint.py adapted_from_checkpoint)."""
    from dataclasses import asdict

    from llmkit.adapters.lora import LoraConfig, apply_lora
    from llmkit.adapters.qlora import apply_qlora, qlora_configs, quant_record

    options = {k: v for k, v in finetune.items() if k != "name"}
    if finetune["name"] == "qlora":
        lora, quant = qlora_configs(options)
        apply_qlora(model, lora, quant)
        return {"config": asdict(lora), "quant": quant_record(quant, model)}
    lora = LoraConfig(**{k: (list(v) if k == "targets" else v) for k, v in options.items()})
    apply_lora(model, lora)
    return {"config": asdict(lora)}


def _key(name: str) -> str:
    """ModuleDict keys cannot hold dots or slashes: rewards/accuracies -> rewards__accuracies."""
    return name.replace("/", "__").replace(".", "_")


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for p in _params(optimizer) if p.grad is not None]


def _full(norm: torch.Tensor) -> torch.Tensor:
    """A norm over FSDP-sharded gradients is a DTensor; the logger wants the plain total."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

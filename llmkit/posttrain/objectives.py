"""Training objectives, chosen by `task=`: each turns a batch into a loss (DESIGN.md section 8).

    lm      pre-training: the model's own next-token loss over (inputs, targets[, positions, segments])
    sft     supervised fine-tuning: cross-entropy over the scored tokens of packed rows, summed and
            divided by the scored tokens of the whole optimizer step (llmkit/posttrain/rows.py), so
            any split into micro-batches, accumulation and ranks gives the same gradient
    dpo     direct preference optimisation over (chosen, rejected) rows against a reference model:
            a frozen copy of the base, the base itself with LoRA switched off, or log-probabilities
            precomputed once with the base and stored next to the prepared data
    reward  a scalar head on the final hidden state of each reply's last token, Bradley-Terry loss

An objective is an nn.Module so that what it trains (the reward head) is in the checkpoint and the
optimizer; a frozen reference model is held outside the module tree (neither). The LightningModule
calls `attach` once the base model exists (before LoRA is applied), `training_loss` per step and
`validation` per validation batch, whose named (sum, count) pairs it averages over the val set.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.model import Transformer
from llmkit.posttrain.losses import DPO_LOSSES, bradley_terry_loss, dpo_loss, sequence_logprobs
from llmkit.posttrain.packing import IGNORE
from llmkit.registry import Registry

OBJECTIVES: Registry[Objective] = Registry("task")
# finetune= choices that train adapters over a frozen base: their reference can be the base with adapters off
ADAPTER_FINETUNES = ("lora", "qlora")


def frozen_copy(model: Transformer) -> Transformer:
    """A reference model: a copy kept outside the module tree (not trained, not saved in checkpoints). Of an
    adapted model, the copy computes its base: its adapters (a few tensors) are switched off for good, and a
    QLoRA base stays quantized (its codes and scales are copied: a fraction of the full-precision weights)."""
    from llmkit.adapters.lora import lora_layers

    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    for _, layer in lora_layers(reference):
        layer.lora_enabled = False
    return reference


class ReferenceCopy:
    """A frozen copy of the policy's starting model, as DPO's and online RL's reference. Under QLoRA it is
    taken at fit start, once the base is quantized: a copy of the quantized base the policy starts from, at
    its size; a copy taken earlier would be the full-precision base the run exists to avoid holding."""

    def __init__(self, model: Transformer, finetune: str) -> None:
        self.model: Transformer | None = None if finetune == "qlora" else frozen_copy(model)

    def place(self, model: Transformer, device: torch.device) -> None:
        """At fit start: the copy (taken now if it waited for the quantized base) on the run's device."""
        if self.model is None:
            self.model = frozen_copy(model)
        self.model.to(device)


REFERENCES = ("copy", "lora", "precomputed")


@dataclass
class StepOutput:
    loss: Tensor  # what the optimizer minimises
    logs: dict[str, Tensor] = field(default_factory=dict)  # train/<name>
    metrics: dict[str, Tensor] = field(default_factory=dict)  # statistics the model reports (MoE load), logged sparsely


class Objective(nn.Module):
    val_names: tuple[str, ...] = ("loss",)
    perplexity = False  # val/loss is a token-mean cross-entropy: val/ppl is logged beside it

    def attach(self, model: Transformer, init_from: str | None, finetune: str) -> None:
        """Called once the (base) model is built, before LoRA: build a head, copy a reference."""

    def on_fit_start(self, lit: Any) -> None:
        """Called at the start of fit, with the datamodule prepared (precomputed references)."""

    def training_loss(self, model: Transformer, batch: Any, scale: float) -> StepOutput:
        """scale = accumulation x world size: Lightning and DDP divide the loss by it again."""
        raise NotImplementedError

    def before_optimizer_step(self, module: nn.Module) -> None:
        """Called once a step's gradients are summed over its micro-batches and ranks, before clipping: a
        normaliser known only then (online RL's tokens of the whole step) is applied here."""

    def validation(self, model: Transformer, batch: Any) -> dict[str, tuple[Tensor, Tensor]]:
        raise NotImplementedError


@OBJECTIVES.register("lm")
class LanguageModeling(Objective):
    perplexity = True
    def training_loss(self, model: Transformer, batch: tuple[Tensor, ...], scale: float) -> StepOutput:
        inputs, targets, *document = batch  # packed rows add (positions, segments)
        out = model.loss(inputs, targets, *document)
        logs = {"loss": out.loss, **{f"aux/{name}": value for name, value in out.aux.items()}}
        return StepOutput(out.loss, logs, out.metrics)

    def validation(self, model: Transformer, batch: tuple[Tensor, ...]) -> dict[str, tuple[Tensor, Tensor]]:
        inputs, targets, *document = batch
        out = model.loss(inputs, targets, *document)
        count = torch.tensor(targets.numel(), device=targets.device)
        return {"loss": (out.ce * count, count)}


def _token_losses(model: Transformer, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(sum of cross-entropy over scored tokens, scored tokens, correctly predicted scored tokens)."""
    labels = batch["labels"]
    logits = model(batch["ids"], batch.get("positions"), batch.get("segments"))  # (B, T, V)
    flat = logits.flatten(0, 1).float()
    ce_sum = F.cross_entropy(flat, labels.flatten(), ignore_index=IGNORE, reduction="sum")
    scored = labels != IGNORE
    correct = ((logits.argmax(dim=-1) == labels) & scored).sum()
    return ce_sum, scored.sum(), correct


@OBJECTIVES.register("sft")
class SupervisedFineTuning(Objective):
    val_names = ("loss", "accuracy")
    perplexity = True

    def training_loss(self, model: Transformer, batch: dict[str, Tensor], scale: float) -> StepOutput:
        ce_sum, scored, correct = _token_losses(model, batch)
        aux = model.pop_aux_losses()
        loss = ce_sum * (scale / batch["step_scored"].clamp(min=1)) + sum(aux.values())
        logs = {"loss": ce_sum.detach() / scored.clamp(min=1), "accuracy": correct / scored.clamp(min=1),
                **{f"aux/{name}": value for name, value in aux.items()}}
        return StepOutput(loss, logs, model.pop_metrics())

    def validation(self, model: Transformer, batch: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        ce_sum, scored, correct = _token_losses(model, batch)
        model.pop_aux_losses()
        return {"loss": (ce_sum, scored), "accuracy": (correct.float(), scored)}


def _pair(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, int]:
    """Chosen rows then rejected rows in one batch: (2B, T) ids and labels, and B."""
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    return ids, labels, batch["chosen_ids"].size(0)


class PairObjective(Objective):
    """A mean loss over (chosen, rejected) pairs; every micro-batch holds B of them, so the mean over
    micro-batches that Lightning and DDP take is the mean over the step's pairs."""

    val_metrics: dict[str, str] = {}  # val name -> key of the metrics `losses` returns

    def losses(self, model: Transformer, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def training_loss(self, model: Transformer, batch: dict[str, Tensor], scale: float) -> StepOutput:
        loss, metrics = self.losses(model, batch)
        aux = model.pop_aux_losses()
        return StepOutput(loss + sum(aux.values()), {"loss": loss.detach(), **metrics}, model.pop_metrics())

    def validation(self, model: Transformer, batch: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        loss, metrics = self.losses(model, batch)
        model.pop_aux_losses()
        n = torch.tensor(batch["chosen_ids"].size(0), device=loss.device)
        return {"loss": (loss * n, n), **{name: (metrics[key] * n, n) for name, key in self.val_metrics.items()}}


@OBJECTIVES.register("dpo")
class DirectPreference(PairObjective):
    val_names = ("loss", "rewards/accuracies", "rewards/margins")
    val_metrics = {"rewards/accuracies": "rewards/accuracies", "rewards/margins": "rewards/margins"}

    def __init__(self, beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0,
                 reference: str = "copy") -> None:
        super().__init__()
        DPO_LOSSES.get(loss)  # an unknown variant fails at construction, listing the valid ones
        if reference not in REFERENCES:
            raise ValueError(f"task.reference={reference}: choose one of {', '.join(REFERENCES)}")
        self.beta, self.kind, self.label_smoothing, self.reference = beta, loss, label_smoothing, reference
        self.average = loss == "ipo"  # IPO regresses per-token log-ratios (as Azar et al. and TRL do); DPO sums
        self._copy: ReferenceCopy | None = None  # reference=copy; not a module: not trained or saved
        self.init_from: str | None = None

    def attach(self, model: Transformer, init_from: str | None, finetune: str) -> None:
        if self.reference == "lora" and finetune not in ADAPTER_FINETUNES:
            raise ValueError("task.reference=lora uses the base with its adapters switched off: it needs finetune=lora")
        if self.reference == "precomputed" and init_from is None:
            raise ValueError("task.reference=precomputed computes the reference with the base model: give init_from=")
        self.init_from = init_from
        if self.reference == "copy":
            self._copy = ReferenceCopy(model, finetune)

    def on_fit_start(self, lit: Any) -> None:
        if self._copy is not None:
            self._copy.place(lit.model, lit.device)
        if self.reference == "precomputed":
            attach_precomputed_reference(lit.trainer.datamodule, self.init_from, lit.device)

    def reference_logprobs(self, model: Transformer, batch: dict[str, Tensor], ids: Tensor, labels: Tensor) -> Tensor:
        if "ref_chosen" in batch:  # precomputed sums; IPO's per-token means divide by the scored tokens
            stored = torch.cat([batch["ref_chosen"], batch["ref_rejected"]]).float()
            return stored / (labels != IGNORE).sum(-1).clamp(min=1) if self.average else stored
        if self.reference == "precomputed":
            raise RuntimeError("precomputed reference log-probs are missing from the batch")
        with torch.no_grad():
            if self.reference == "lora":
                from llmkit.adapters.lora import lora_disabled

                with lora_disabled(model):
                    return sequence_logprobs(model(ids), labels, average=self.average)
            return sequence_logprobs(self._copy.model(ids), labels, average=self.average)

    def losses(self, model: Transformer, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        ids, labels, n = _pair(batch)
        policy = sequence_logprobs(model(ids), labels, average=self.average)  # (2B,)
        reference = self.reference_logprobs(model, batch, ids, labels)
        return dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.beta, self.kind, self.label_smoothing)


def last_scored_positions(labels: Tensor) -> Tensor:
    """(B,) the position of each row's last scored token (EOS / end of turn): label t scores token t + 1."""
    scored = labels != IGNORE  # (B, T)
    T = labels.size(1)
    last_label = T - 1 - scored.flip(-1).int().argmax(dim=-1)
    return (last_label + 1).clamp(max=T - 1)


@OBJECTIVES.register("reward")
class RewardModel(PairObjective):
    """r(x, y) = w . h, h the final hidden state of the reply's last token; w starts at zero, so every
    pair starts at the Bradley-Terry loss ln 2."""

    val_names = ("loss", "accuracy")
    val_metrics = {"accuracy": "reward/accuracy"}

    def __init__(self, margin: bool = False) -> None:
        super().__init__()
        self.use_margin = margin
        self.head: nn.Linear | None = None

    def attach(self, model: Transformer, init_from: str | None, finetune: str) -> None:
        w = model.head.weight
        self.head = nn.Linear(model.cfg.d_model, 1, bias=False, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.head.weight)
        if w is not model.tok_emb.weight:  # an untied LM head is never read here: frozen (DDP refuses unused ones)
            model.head.requires_grad_(False)

    def scores(self, model: Transformer, ids: Tensor, labels: Tensor) -> Tensor:
        hidden = model.features(ids)  # (2B, T, C)
        last = last_scored_positions(labels)
        picked = hidden[torch.arange(ids.size(0), device=ids.device), last]  # (2B, C)
        return self.head(picked).squeeze(-1).float()

    def losses(self, model: Transformer, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        ids, labels, n = _pair(batch)
        r = self.scores(model, ids, labels)
        margin = batch.get("margin") if self.use_margin else None
        return bradley_terry_loss(r[:n], r[n:], margin)


# ---- precomputed reference log-probabilities ------------------------------------------------------------
def reference_file(directory: Path, init_from: str) -> Path:
    """Next to the prepared data, named for the base model file (path, size, modification time)."""
    path = Path(init_from).expanduser()
    stat = (path / "model.safetensors" if path.is_dir() else path).stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return directory / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"


@torch.no_grad()
def compute_reference(
    model: Transformer, arrays: dict[str, np.ndarray], device: Any, batch_size: int = 8
) -> dict[str, np.ndarray]:
    """(R,) summed log-probs of the chosen and rejected rows under `model`."""
    model.eval()
    out: dict[str, list[np.ndarray]] = {"ref_chosen": [], "ref_rejected": []}
    for side in ("chosen", "rejected"):
        ids, labels = arrays[f"{side}_ids"], arrays[f"{side}_labels"]
        for start in range(0, len(ids), batch_size):
            chunk = slice(start, start + batch_size)
            logits = model(torch.from_numpy(ids[chunk]).to(device))
            logps = sequence_logprobs(logits, torch.from_numpy(labels[chunk]).to(device))
            out[f"ref_{side}"].append(logps.float().cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def attach_precomputed_reference(datamodule: Any, init_from: str, device: Any) -> None:
    """Load (or compute once with a fresh copy of the base, then save) the reference log-probs of
    every split, and add them to the datamodule's rows so that batches carry them."""
    import os

    from llmkit.checkpoint import load_base

    datamodule.setup()
    path = reference_file(datamodule.directory(), init_from)
    if not path.exists():
        model, _ = load_base(init_from, device)
        values = {f"{split}/{name}": v for split, arrays in datamodule.splits.items()
                  for name, v in compute_reference(model.to(device), arrays, device).items()}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, **values)
        os.replace(tmp, path)
    with np.load(path) as saved:
        for key in saved.files:
            split, name = key.split("/")
            datamodule.splits[split][name] = saved[key]

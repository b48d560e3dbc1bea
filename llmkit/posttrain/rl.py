"""Online RL objectives (`task=grpo | rloo`): each training step samples completions of its prompts with the
policy, scores them (llmkit/posttrain/rewards.py), and updates on them (llmkit/posttrain/rl_losses.py).

The rollout. A micro-batch's B prompts, each repeated num_generations (G) times, are ONE batch of
N = B x G rows through llmkit's batched KV-cache decoder (llmkit/generation/groups.py over the decoder
the server and `llmkit generate` use; each prompt prefilled once for its group), each row stopping at
the template's end of turn (or EOS), or cut at max_completion_length (counted as truncated). Under
FSDP every rank samples its own prompts with the sharded model, in lockstep with the other ranks.
The sampler's generator is seeded from (data seed, step, accumulation slot, rank), so a resumed run
samples what the uninterrupted one did.

The update. One forward of the N rows [prompt, completion] (right-padded, so no mask is needed)
gives the per-token log-probs of the completion tokens at temperature T (logits / T, as TRL). The
importance ratio is against the rollout's log-probs: at a rollout's first update they are these
very log-probs, detached (ratio exactly 1, nothing clipped); with num_iterations > 1 they are kept
for the updates that reuse the rollout (the data module brings its prompts back; the kept rollout is
in the checkpoint, so a resume mid-way goes on with it).

The reference (beta != 0): the base with its adapters off (finetune=lora), else a frozen copy of
the base; with beta = 0 none is built. Its log-probs are taken once per rollout. The KL goes into
the loss per token (GRPO, kl_in=loss, k3 by default) or is summed per completion and subtracted
from the reward (RLOO, kl_in=reward, k1 by default).
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmkit.generation.groups import sample_groups
from llmkit.model import Transformer
from llmkit.posttrain.grouped import ScoredLogits, policy_logits
from llmkit.posttrain.objectives import ADAPTER_FINETUNES, OBJECTIVES, Objective, ReferenceCopy, StepOutput
from llmkit.posttrain.packing import IGNORE
from llmkit.posttrain.rewards import REWARDS, Completions, score
from llmkit.posttrain.rl_losses import (
    GRPO_LOSSES,
    KL_ESTIMATORS,
    group_advantages,
    grpo_loss,
    rloo_advantages,
    rloo_loss,
    sequence_kl,
)

REFERENCES = ("auto", "copy", "lora")


@dataclass
class Rollout:
    """N = prompts x G rows; per-token tensors (N, T) over [prompt, completion, padding]."""

    ids: Tensor  # (N, T) long
    labels: Tensor  # (N, T): labels[t] = ids[t + 1] on completion tokens, IGNORE elsewhere
    rewards: Tensor  # (N,) float64, NaN where unscorable (after any KL penalty)
    advantages: Tensor  # (N,)
    ref_logps: Tensor | None = None  # (N, T) the reference's, when beta != 0
    old_logps: Tensor | None = None  # (N, T) the policy's at the rollout, kept for num_iterations > 1
    old_values: Tensor | None = None  # PPO: (N, T) the value head's at the rollout
    returns: Tensor | None = None  # PPO: (N, T) the value targets

    @property
    def mask(self) -> Tensor:
        return (self.labels != IGNORE).float()

    def state(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class Sampled:
    """A batch's completions (N = prompts x G rows) and their rewards."""

    completions: list[list[int]]
    truncated: list[bool]
    scored: Completions
    rewards: Tensor  # (N,) float64, NaN where unscorable
    unscorable: int


def rollout_generator(device: torch.device, seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The sampler's random numbers, a function of where in the run they are drawn: resume is exact."""
    key = hashlib.sha256(f"{seed}:{step}:{micro}:{rank}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(key[:8], "big") >> 1)


def layout(prompts: list[list[int]], completions: list[list[int]], num_generations: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """(N, T) ids [prompt, completion] right-padded, and labels naming each completion token at the
    position that predicts it."""
    rows = [p for p in prompts for _ in range(num_generations)]
    width = max(len(p) + len(c) for p, c in zip(rows, completions, strict=True))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (p, c) in enumerate(zip(rows, completions, strict=True)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p) - 1 : len(p) - 1 + len(c)] = torch.tensor(c, dtype=torch.long)
    return ids, labels


TABLE_COLUMNS = ("step", "prompt", "completion", "reward")


def table_rows(step: int, batch: Completions, rewards: Tensor) -> list[list[Any]]:
    """The rollout's (step, prompt, completion, reward) rows; a chat prompt as JSON."""
    return [[step, prompt if isinstance(prompt, str) else json.dumps(prompt), text, value]
            for prompt, text, value in zip(batch.prompts, batch.texts, rewards.tolist(), strict=True)]


def write_table(path: Path, step: int, batch: Completions, rewards: Tensor) -> None:
    """Append the rollout's completions and rewards to a csv (step, prompt, completion, reward)."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(TABLE_COLUMNS)
        writer.writerows(table_rows(step, batch, rewards))


class OnlineRL(Objective):
    """What GRPO and RLOO share: the rollout, the reference, the logs. Subclasses give the advantages
    and the loss."""

    min_generations = 2  # a group to compare each completion with
    sequence_kl = True  # kl_in=reward: the completion's summed KL comes off its reward (PPO: per token instead)
    default_kl_in = "loss"
    default_kl_estimator = "k3"

    def __init__(
        self, reward: dict[str, Any] | None = None, num_generations: int = 8, max_completion_length: int = 64,
        temperature: float = 1.0, top_p: float = 1.0, beta: float = 0.0, kl_estimator: str | None = None,
        kl_in: str | None = None, epsilon: float = 0.2, epsilon_high: float | None = None, num_iterations: int = 1,
        reference: str = "auto", log_completions: int = 0, shared_prompts: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if num_generations < self.min_generations:
            raise ValueError(f"{name}: num_generations={num_generations} leaves no group to compare a completion "
                             "with: use num_generations >= 2")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}: online RL samples, so it must be > 0")
        if reference not in REFERENCES:
            raise ValueError(f"task.reference={reference}: choose one of {', '.join(REFERENCES)}")
        if max_completion_length < 1 or num_iterations < 1:
            raise ValueError("max_completion_length and num_iterations must be >= 1")
        self.kl_in = kl_in or self.default_kl_in
        if self.kl_in not in ("loss", "reward"):
            raise ValueError(f"task.kl_in={self.kl_in}: choose loss (per token) or reward (per completion)")
        self.kl_estimator = kl_estimator or self.default_kl_estimator
        KL_ESTIMATORS.get(self.kl_estimator)
        reward = dict(reward or {"name": "exact_match"})
        self.reward = REWARDS.build(reward.pop("name"), **reward)
        self.G, self.max_new, self.temperature, self.top_p = num_generations, max_completion_length, temperature, top_p
        self.beta, self.epsilon, self.epsilon_high, self.num_iterations = beta, epsilon, epsilon_high, num_iterations
        self.reference, self.log_completions = reference, log_completions
        self.shared_prompts = shared_prompts  # the update runs each prompt once for its group (grouped.py)
        self._table: Path | None = None  # completions.csv in the run directory (rank 0)
        self._wandb: Any = None  # and a wandb Table, when the run logs to wandb
        self.val_names = ("reward", f"rewards/{self.reward.name}", "completions/mean_length", "completions/truncated")
        self._copy: ReferenceCopy | None = None  # the reference, for reference=copy; not a module: not trained or saved
        self._use_lora_reference = False
        self._rollouts: dict[int, Rollout] = {}  # accumulation slot -> the rollout its updates reuse
        self.tokenizer: Any = None
        self.stop_id: int | None = None
        self.pad_id = 0
        self._last_call: float | None = None
        self._last_rollout_s = 0.0
        self._scale = 1.0  # this step's accumulation x world size (a loss that sums over the step undoes it)

    # ---- construction --------------------------------------------------------------------------------
    def attach(self, model: Transformer, init_from: str | None, finetune: str) -> None:
        if self.beta == 0:
            return  # no reference is built
        adapters = finetune in ADAPTER_FINETUNES
        kind = self.reference if self.reference != "auto" else ("lora" if adapters else "copy")
        if kind == "lora" and not adapters:
            raise ValueError("task.reference=lora uses the base with its adapters switched off: it needs finetune=lora")
        self._use_lora_reference = kind == "lora"
        if kind == "copy":
            self._copy = ReferenceCopy(model, finetune)

    def on_fit_start(self, lit: Any) -> None:
        from llmkit.text.chat import end_of_turn_id

        if self._copy is not None:
            self._copy.place(lit.model, lit.device)
        datamodule = lit.trainer.datamodule
        self.tokenizer = datamodule.tokenizer
        self.stop_id = end_of_turn_id(self.tokenizer, datamodule.template)
        self.pad_id = next((i for i in (self.tokenizer.pad_id, self.tokenizer.eos_id) if i is not None), 0)
        self.reward.bind(self.tokenizer, lit.device)
        if self.log_completions and lit.trainer.is_global_zero:
            from lightning.pytorch.loggers import WandbLogger

            self._table = Path(lit.trainer.default_root_dir) / "completions.csv"
            self._wandb = next((lg for lg in lit.loggers if isinstance(lg, WandbLogger)), None)

    # ---- the rollout ---------------------------------------------------------------------------------
    def rollout(self, model: Transformer, batch: dict[str, Any]) -> tuple[Rollout, dict[str, Tensor]]:
        device = model.head.weight.device
        generator = rollout_generator(device, batch["seed"], batch["step"], batch["micro"], batch["rank"])
        sampled = self.sample_and_score(model, batch, generator)
        raw = sampled.rewards
        ids, labels = layout(batch["rows"].tokens, sampled.completions, self.G, self.pad_id)
        ids, labels = ids.to(device), labels.to(device)
        rollout = Rollout(ids, labels, raw.clone(), raw.new_zeros(len(raw)))
        if self._table is not None and batch["step"] % self.log_completions == 0:
            write_table(self._table, batch["step"], sampled.scored, raw)
            if self._wandb is not None:
                self._wandb.log_table("completions", columns=list(TABLE_COLUMNS),
                                      data=table_rows(batch["step"], sampled.scored, raw), step=batch["step"])
        logs: dict[str, Tensor] = {}
        if self.beta != 0:
            with torch.no_grad():
                rollout.ref_logps = self._reference_logps(model, ids, labels)
                if self.kl_in == "reward" and self.sequence_kl:  # the sampling policy's log-probs, as TRL's RLOO
                    old = self.logits(model, ids, labels).logprobs(self.temperature)
                    kl = sequence_kl(old, rollout.ref_logps, rollout.mask, self.kl_estimator)  # (N,)
                    rollout.rewards = raw - self.beta * kl.double().cpu()
                    logs["kl"] = kl.sum() / rollout.mask.sum().clamp(min=1)  # per token, as in the loss
        logs.update(self.finish(model, rollout))
        lengths = torch.tensor([float(len(c)) for c in sampled.completions])
        finite = raw[~torch.isnan(raw)]
        logs.update({
            "reward": finite.mean() if finite.numel() else raw.new_tensor(float("nan")),
            "reward_std": finite.std() if finite.numel() > 1 else raw.new_zeros(()),
            f"rewards/{self.reward.name}": finite.mean() if finite.numel() else raw.new_tensor(float("nan")),
            "unscorable": torch.tensor(float(sampled.unscorable)),
            "completions/mean_length": lengths.mean(), "completions/max_length": lengths.max(),
            "completions/truncated": torch.tensor(sum(sampled.truncated) / len(sampled.truncated)),
        })
        return rollout, {k: v.float() for k, v in logs.items()}

    def sample_and_score(self, model: Transformer, batch: dict[str, Any], generator: torch.Generator) -> Sampled:
        """The batch's prompts num_generations times each, sampled and scored (NaN: unscorable)."""
        rows = batch["rows"]  # llmkit/posttrain/prompts.py PromptRows
        completions, truncated = sample_groups(model, rows.tokens, self.G, self.max_new, temperature=self.temperature,
                                               top_p=self.top_p, stop_id=self.stop_id, generator=generator)
        texts = [self.tokenizer.decode([t for t in c if t != self.stop_id]) for c in completions]
        repeat = [i for i in range(len(rows.records)) for _ in range(self.G)]
        scored = Completions([rows.prompts[i] for i in repeat], texts, completions,
                             [rows.records[i] for i in repeat], [rows.tokens[i] for i in repeat])
        rewards, unscorable = score(self.reward, scored)
        return Sampled(completions, truncated, scored, rewards, unscorable)

    def validation(self, model: Transformer, batch: dict[str, Any]) -> dict[str, tuple[Tensor, Tensor]]:
        """Held-out prompts sampled as a rollout samples them (the same draws at every validation): the mean
        reward over the scorable completions, and the completions' lengths."""
        generator = rollout_generator(model.head.weight.device, batch["seed"], -1 - batch["val_batch"], 0, batch["rank"])
        sampled = self.sample_and_score(model, batch, generator)
        counted = torch.tensor([c for c in batch["counted"] for _ in range(self.G)])  # (N,): not a repeated row
        scorable = counted & ~torch.isnan(sampled.rewards)
        reward = (sampled.rewards[scorable].sum().float(), scorable.sum())
        lengths = torch.tensor([float(len(c)) for c in sampled.completions])
        truncated = torch.tensor(sampled.truncated, dtype=torch.float32)
        return {"reward": reward, f"rewards/{self.reward.name}": reward,
                "completions/mean_length": (lengths[counted].sum(), counted.sum()),
                "completions/truncated": (truncated[counted].sum(), counted.sum())}

    @staticmethod
    def device_of(module: torch.nn.Module) -> torch.device:
        return next(module.parameters()).device

    def _reference_logps(self, model: Transformer, ids: Tensor, labels: Tensor) -> Tensor:
        if self._use_lora_reference:
            from llmkit.adapters.lora import lora_disabled

            with lora_disabled(model):
                return self.logits(model, ids, labels).logprobs(self.temperature)
        return self.logits(self._copy.model, ids, labels).logprobs(self.temperature)

    def finish(self, model: Transformer, rollout: Rollout) -> dict[str, Tensor]:
        """The rollout's advantages, from its rewards; returns what it logs."""
        rollout.advantages = self.advantages(rollout.rewards).to(rollout.ids.device)
        return {}

    def advantages(self, rewards: Tensor) -> Tensor:
        raise NotImplementedError

    def logits(self, model: Transformer, ids: Tensor, labels: Tensor) -> ScoredLogits:
        """The logits where the labels score them, each prompt run once for its group
        (llmkit/posttrain/grouped.py): the policy's and the reference's alike."""
        return policy_logits(model, ids, labels, self.G if self.shared_prompts else 1)

    def policy_forward(self, model: Transformer, rollout: Rollout) -> tuple[ScoredLogits, Tensor | None]:
        """The update's logits, and what else the loss reads (PPO: the (N, T, C) hidden states)."""
        return self.logits(model, rollout.ids, rollout.labels), None

    def loss(self, logps: Tensor, old_logps: Tensor, rollout: Rollout, hidden: Tensor | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    # ---- the step ------------------------------------------------------------------------------------
    def training_loss(self, model: Transformer, batch: dict[str, Any], scale: float) -> StepOutput:
        started = time.perf_counter()
        self._scale = scale
        logs: dict[str, Tensor] = {}
        if self._last_call is not None:  # the previous step's forward, backward and optimizer step
            logs["time/update_s"] = torch.tensor(started - self._last_call - self._last_rollout_s)
        self._last_call = started
        rollout = self._rollouts.get(batch["micro"]) if batch["iteration"] > 0 else None
        if rollout is None:
            rollout, rollout_logs = self.rollout(model, batch)
            logs.update(rollout_logs)
            self._last_rollout_s = time.perf_counter() - started
            logs["time/rollout_s"] = torch.tensor(self._last_rollout_s)
        else:
            self._last_rollout_s = 0.0
        logits, hidden = self.policy_forward(model, rollout)
        logps = logits.logprobs(self.temperature)  # (N, T)
        if rollout.old_logps is None:  # the rollout's first update: the policy has not moved since it sampled
            rollout.old_logps = logps.detach()
        if self.num_iterations > 1:
            self._rollouts[batch["micro"]] = rollout
        loss, metrics = self.loss(logps, rollout.old_logps, rollout, hidden)
        aux = model.pop_aux_losses()
        logs.update({"loss": loss.detach(), **metrics, "entropy": logits.entropy(self.temperature)})
        return StepOutput(loss + sum(aux.values()), logs, model.pop_metrics())

    # ---- a kept rollout is part of the run's state (num_iterations > 1) ------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {micro: rollout.state() for micro, rollout in self._rollouts.items()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._rollouts = {int(micro): Rollout(**values) for micro, values in (state or {}).items()}


@OBJECTIVES.register("grpo")
class GRPO(OnlineRL):
    """Group-normalised advantages, TRL's clipped token-level loss (loss_type grpo | bnpo | dr_grpo | dapo)."""

    def __init__(self, *args: Any, loss_type: str = "dapo", scale_rewards: str = "group", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        GRPO_LOSSES.get(loss_type)
        group_advantages(torch.zeros(2), 2, scale_rewards)  # an unknown scale fails at construction
        self.loss_type, self.scale_rewards = loss_type, scale_rewards
        self._step_tokens = 0.0  # dapo: completion tokens of this rank's micro-batches since the last step

    def advantages(self, rewards: Tensor) -> Tensor:
        return group_advantages(rewards, self.G, self.scale_rewards).float()

    def loss(self, logps: Tensor, old_logps: Tensor, rollout: Rollout, hidden: Tensor | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
        in_loss = self.beta if self.kl_in == "loss" else 0.0
        # dapo divides by the tokens of the whole step (every micro-batch and rank, as TRL's num_items_in_batch),
        # known only after the step's last rollout: the micro-batch's sum over a fixed unit goes backward here,
        # and before_optimizer_step turns unit into the step's tokens
        num_items = torch.tensor(self._dapo_unit, device=logps.device) if self.loss_type == "dapo" else None
        loss, metrics = grpo_loss(logps, old_logps, rollout.advantages, rollout.mask, epsilon=self.epsilon,
                                  epsilon_high=self.epsilon_high, loss_type=self.loss_type, beta=in_loss,
                                  ref_logps=rollout.ref_logps, kl_estimator=self.kl_estimator,
                                  max_completion_length=self.max_new, num_items=num_items)
        if num_items is None:
            return loss, metrics
        tokens = float(rollout.mask.sum())
        self._step_tokens += tokens
        metrics["loss"] = loss.detach() * self._dapo_unit / max(tokens, 1.0)  # this micro-batch's own dapo value
        return loss * self._scale, metrics  # Lightning and DDP divide by accumulation x world: undone

    @property
    def _dapo_unit(self) -> float:
        return float(self.G * self.max_new)  # any constant, the same on every micro-batch and rank

    def before_optimizer_step(self, module: torch.nn.Module) -> None:
        if not self._step_tokens:
            return
        total = torch.tensor(self._step_tokens, dtype=torch.float64, device=self.device_of(module))
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(total)
        factor = self._dapo_unit / max(float(total), 1.0)
        for p in module.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
        self._step_tokens = 0.0


@OBJECTIVES.register("rloo")
class RLOO(OnlineRL):
    """Leave-one-out baseline, the KL (k1) subtracted from the reward, TRL's clipped sequence-level loss."""

    default_kl_in = "reward"
    default_kl_estimator = "k1"

    def __init__(self, *args: Any, normalize_advantages: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.kl_in != "reward":
            raise ValueError("task=rloo puts the KL into the reward (kl_in=reward); per-token KL in the loss is GRPO's")
        self.normalize_advantages = normalize_advantages

    def advantages(self, rewards: Tensor) -> Tensor:
        return rloo_advantages(rewards, self.G, self.normalize_advantages).float()

    def loss(self, logps: Tensor, old_logps: Tensor, rollout: Rollout, hidden: Tensor | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
        return rloo_loss(logps, old_logps, rollout.advantages, rollout.mask, epsilon=self.epsilon,
                         epsilon_high=self.epsilon_high)

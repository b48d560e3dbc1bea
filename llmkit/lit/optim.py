"""AdamW with decay / no-decay parameter groups, and learning-rate schedules by name."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from llmkit.registry import Registry

# name -> factory(**options) -> lr multiplier as a function of the step
SCHEDULES: Registry[Callable[[int], float]] = Registry("scheduler")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear and embedding weights) decay; biases, norm gains and 1-D tables do not."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(
    model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.1,
    eps: float = 1e-8, fused: bool | None = None,
) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=fused)


@SCHEDULES.register("constant")
def constant(warmup_steps: int = 0, **_: object) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / (warmup_steps + 1)) if warmup_steps else 1.0


@SCHEDULES.register("cosine")
def warmup_cosine(total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.1, **_: object) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to min_lr_ratio of the peak at total_steps."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


@SCHEDULES.register("wsd")
def warmup_stable_decay(
    total_steps: int, warmup_steps: int = 100, decay_fraction: float = 0.2, min_lr_ratio: float = 0.0, **_: object
) -> Callable[[int], float]:
    """Warmup, a constant plateau, then linear decay over the last decay_fraction of training."""
    decay_start = total_steps - int(decay_fraction * total_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - min_lr_ratio) * progress

    return multiplier


OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")
OPTIMIZERS.register("adamw")(adamw)

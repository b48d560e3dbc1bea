"""Weight initialisation: normal(0, std) everywhere, with residual output projections scaled
by 1/sqrt(2 * n_layers) (GPT-2) so the residual stream's variance does not grow with depth."""

from __future__ import annotations

import math

from torch import nn

_RESIDUAL_FLAG = "llmkit_residual_out"


def mark_residual(linear: nn.Linear) -> nn.Linear:
    """Mark a projection that writes into the residual stream."""
    setattr(linear, _RESIDUAL_FLAG, True)
    return linear


def init_weights(model: nn.Module, std: float, n_layers: int) -> None:
    residual_std = std / math.sqrt(2 * n_layers)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, residual_std if getattr(module, _RESIDUAL_FLAG, False) else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif hasattr(module, "init_parameters"):  # raw parameters, such as stacked MoE expert weights
            module.init_parameters(std, residual_std)

"""Feed-forward layers, chosen by name from `conf/model/ffn/`.

An FFN maps (B, T, C) -> (B, T, C). A layer that adds an auxiliary training loss (the
Mixture-of-Experts router's balancing loss, for instance) implements `AuxLossProvider`, and the
transformer adds what it reports to the language-model loss; one with statistics worth logging
implements `MetricsProvider`. Every FFN takes `layer`, the index of its block (see moe.py).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.model.init import mark_residual
from llmkit.registry import Registry

FFNS: Registry[nn.Module] = Registry("ffn")


@runtime_checkable
class AuxLossProvider(Protocol):
    def pop_aux_losses(self) -> dict[str, Tensor]:
        """Auxiliary losses of the last forward pass, already weighted by their coefficients."""
        ...


@runtime_checkable
class MetricsProvider(Protocol):
    def pop_metrics(self) -> dict[str, Tensor]:
        """Detached statistics of the last forward pass, keyed by names unique in the model."""
        ...


def hidden_size(d_model: int, hidden_mult: float, multiple_of: int) -> int:
    return multiple_of * math.ceil(hidden_mult * d_model / multiple_of)


@FFNS.register("mlp")
class MLP(nn.Module):
    """Linear -> GELU -> Linear, as in GPT-2. `layer` (the block's index) is unused by dense FFNs."""

    def __init__(
        self, d_model: int, hidden_mult: float = 4.0, multiple_of: int = 1, bias: bool = False, dropout: float = 0.0,
        layer: int = 0,
    ) -> None:
        super().__init__()
        hidden = hidden_size(d_model, hidden_mult, multiple_of)
        self.w_in = nn.Linear(d_model, hidden, bias=bias)
        self.w_out = mark_residual(nn.Linear(hidden, d_model, bias=bias))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.w_out(F.gelu(self.w_in(x))))


@FFNS.register("swiglu")
class SwiGLU(nn.Module):
    """SiLU-gated linear unit (Shazeer 2020), as in Llama: down(silu(gate(x)) * up(x))."""

    def __init__(
        self, d_model: int, hidden_mult: float = 8 / 3, multiple_of: int = 32, bias: bool = False, dropout: float = 0.0,
        layer: int = 0,
    ) -> None:
        super().__init__()
        hidden = hidden_size(d_model, hidden_mult, multiple_of)
        self.w_gate = nn.Linear(d_model, hidden, bias=bias)
        self.w_up = nn.Linear(d_model, hidden, bias=bias)
        self.w_out = mark_residual(nn.Linear(hidden, d_model, bias=bias))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.w_out(F.silu(self.w_gate(x)) * self.w_up(x)))

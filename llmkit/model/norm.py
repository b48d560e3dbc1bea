"""Normalisation layers, chosen by name from `conf/model/norm/`."""

from __future__ import annotations

import torch
from torch import nn

from llmkit.registry import Registry

NORMS: Registry[nn.Module] = Registry("norm")


@NORMS.register("layernorm")
def layernorm(dim: int, bias: bool = True, eps: float = 1e-5) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps, bias=bias)


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    """Root-mean-square norm (no centring, no bias), computed in fp32 for bf16 stability."""

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = False) -> None:
        # `bias` is the model-level flag for Linear and LayerNorm; RMSNorm has none by definition
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

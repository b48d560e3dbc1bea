"""Causal self-attention, chosen by name from `conf/model/attention/`.

MHA, GQA, MQA and sliding-window attention are one class: `n_kv_heads` (None = n_heads) sets
how many key/value heads the query heads share, `window` limits how far back a token sees, and
`kernel` picks the implementation of the same math (see kernels.py).
"""

from __future__ import annotations

from torch import Tensor, nn

from llmkit.model.init import mark_residual
from llmkit.model.kernels import KERNELS
from llmkit.model.positions import PositionContext
from llmkit.registry import Registry

ATTENTION: Registry[nn.Module] = Registry("attention")


@ATTENTION.register("causal")
class CausalSelfAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        window: int | None = None,
        kernel: str = "sdpa",
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or null, got {window}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.window = window
        self.kernel = KERNELS.get(kernel)
        self.dropout = dropout
        kv_dim = n_kv_heads * self.head_dim
        self.wqkv = nn.Linear(d_model, d_model + 2 * kv_dim, bias=bias)
        self.wo = mark_residual(nn.Linear(d_model, d_model, bias=bias))
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, ctx: PositionContext) -> Tensor:
        q, k, v = self.project(x, ctx)
        y = self.kernel(q, k, v, ctx, self.window, self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.output(y)

    def project(self, x: Tensor, ctx: PositionContext) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, C) -> q (B, H, T, D), k and v (B, Hkv, T, D), rotated at their positions (RoPE).
        Generation (llmkit/generation/decode.py) reuses this and `output` around a KV cache."""
        B, T, C = x.shape
        kv_dim = self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([C, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        return ctx.rotate_q(q), ctx.rotate_k(k), v

    def output(self, y: Tensor) -> Tensor:
        """y: (B, H, T, D) attention output -> (B, T, C)."""
        B, H, T, D = y.shape
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, H * D)))

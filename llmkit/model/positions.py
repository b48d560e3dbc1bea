"""Position schemes, chosen by name from `conf/model/position/`.

A scheme can act in three places, and each scheme overrides only the ones it uses:
  embed()    adds absolute position vectors to the token embeddings (learned, sinusoidal);
  context()  precomputes, once per forward, what every attention layer needs:
             rotary tables for q and k (RoPE) or an additive score bias (ALiBi, T5).
The transformer builds one scheme and hands its context to every block, so tables and
learned biases are shared across layers.

Positions are (T,), shared by every row of the batch (training), or (B, T), one row per sequence
(generation decodes prompts of different lengths in lockstep; packed training rows restart them
at 0 in every document); every shape below gains that B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from llmkit.registry import Registry

POSITIONS: Registry["PositionScheme"] = Registry("position")


@dataclass
class PositionContext:
    """Everything position-related one attention call needs; built once per forward."""

    q_pos: Tensor  # (T,) or (B, T) absolute positions of the queries
    k_pos: Tensor  # (S,) or (B, S) absolute positions of the keys
    bias: Tensor | None = None  # (H or 1, T, S) or (B, H, T, S) added to attention scores
    q_rotary: tuple[Tensor, Tensor] | None = None  # cos, sin: (T, head_dim) or (B, 1, T, head_dim)
    k_rotary: tuple[Tensor, Tensor] | None = None  # cos, sin: (S, head_dim) or (B, 1, S, head_dim)
    # Packed rows (document masking): (B, T) and (B, S) document index of each query and key,
    # non-decreasing along the row. A query then sees only earlier keys of its own document.
    q_seg: Tensor | None = None
    k_seg: Tensor | None = None
    # masks built from the above by the first layer's kernel and read by the others (llmkit/model/kernels.py);
    # init=False: a copy made with dataclasses.replace starts empty, as its positions may differ
    masks: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def rotate_q(self, q: Tensor) -> Tensor:
        return q if self.q_rotary is None else apply_rotary(q, *self.q_rotary)

    def rotate_k(self, k: Tensor) -> Tensor:
        return k if self.k_rotary is None else apply_rotary(k, *self.k_rotary)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D); cos, sin: (T, D) or (B, 1, T, D). Half-split convention, as in Hugging Face Llama."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class PositionScheme(nn.Module):
    """No position information at all (NoPE): causal masking alone orders the tokens."""

    def __init__(self, **_: object) -> None:
        super().__init__()

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        return x

    def context(self, q_pos: Tensor, k_pos: Tensor) -> PositionContext:
        return PositionContext(q_pos, k_pos)

    def attention_context(self, q_pos: Tensor, k_pos: Tensor) -> PositionContext:
        """The context of attention over keys that were rotated when they were stored (a KV cache): mask
        positions and bias, no rotary tables."""
        return replace(self.context(q_pos, k_pos), q_rotary=None, k_rotary=None)


POSITIONS.register("none")(PositionScheme)


@POSITIONS.register("learned")
class LearnedPositions(PositionScheme):
    def __init__(self, d_model: int, max_seq_len: int, **_: object) -> None:
        super().__init__()
        self.table = nn.Embedding(max_seq_len, d_model)

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        return x + self.table(pos)


@POSITIONS.register("sinusoidal")
class SinusoidalPositions(PositionScheme):
    """Fixed sine/cosine vectors of "Attention Is All You Need"; nothing is learned.

    `scale` multiplies the table: at amplitude 1 it swamps token embeddings initialised at
    std 0.02 and training stalls (seen in the position ablation), so the default matches them."""

    def __init__(self, d_model: int, max_seq_len: int, base: float = 10000.0, scale: float = 0.02, **_: object) -> None:
        super().__init__()
        pos = torch.arange(max_seq_len, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(base) / d_model))
        table = torch.zeros(max_seq_len, d_model)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
        self.register_buffer("table", scale * table, persistent=False)

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        return x + self.table[pos].to(x.dtype)


@POSITIONS.register("rope")
class RotaryPositions(PositionScheme):
    def __init__(self, head_dim: int, theta: float = 10000.0, **_: object) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _table(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        freqs = pos.float()[..., None] * self.inv_freq  # (T, D/2) or (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, D) or (B, T, D)
        if angles.dim() == 3:
            angles = angles[:, None]  # (B, 1, T, D): the same for every head
        return angles.cos(), angles.sin()

    def context(self, q_pos: Tensor, k_pos: Tensor) -> PositionContext:
        q_rot = self._table(q_pos)
        k_rot = q_rot if k_pos is q_pos else self._table(k_pos)
        return PositionContext(q_pos, k_pos, q_rotary=q_rot, k_rotary=k_rot)

    def attention_context(self, q_pos: Tensor, k_pos: Tensor) -> PositionContext:
        # no tables: a decode step would otherwise compute cos and sin over every cached key, then drop them
        return PositionContext(q_pos, k_pos)


def alibi_slopes(n_heads: int) -> Tensor:
    """Geometric head slopes of Press et al.; non-powers of two interleave the next power's."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two_slopes(closest)
    if closest < n_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes)


@POSITIONS.register("alibi")
class ALiBiPositions(PositionScheme):
    def __init__(self, n_heads: int, **_: object) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def context(self, q_pos: Tensor, k_pos: Tensor) -> PositionContext:
        distance = (k_pos[..., None, :] - q_pos[..., :, None]).float()  # (T, S) or (B, T, S), <= 0 where visible
        bias = self.slopes[:, None, None] * distance.unsqueeze(-3)  # (H, T, S) or (B, H, T, S)
        return PositionContext(q_pos, k_pos, bias=bias)


@POSITIONS.register("t5")
class T5RelativeBias(PositionScheme):
    """T5's learned bias per (head, log-spaced distance bucket), causal (one-sided) buckets."""

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128, **_: object) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bias_table = nn.Embedding(num_buckets, n_heads)

    def bucket(self, distance: Tensor) -> Tensor:
        """distance = query - key >= 0 for visible keys; small ones get exact buckets."""
        distance = distance.clamp(min=0)
        exact = self.num_buckets // 2
        log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
        far = exact + (log_ratio * (self.num_buckets - exact)).long()
        far = far.clamp(max=self.num_buckets - 1)
        return torch.where(distance < exact, distance, far)

    def context(self, q_pos: Tensor, k_pos: Tensor) -> PositionContext:
        buckets = self.bucket(q_pos[..., :, None] - k_pos[..., None, :])  # (T, S) or (B, T, S)
        bias = self.bias_table(buckets).movedim(-1, -3)  # (H, T, S) or (B, H, T, S)
        return PositionContext(q_pos, k_pos, bias=bias)

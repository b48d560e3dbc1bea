"""Attention kernels: the same causal (optionally windowed, optionally biased) attention math,
computed by different implementations. Choosing a kernel never changes the result beyond
floating-point rounding; `tests/model/test_kernels.py` holds every kernel to the eager reference.

Every kernel takes q: (B, H, T, D), k and v: (B, Hkv, S, D) with H a multiple of Hkv, and
returns (B, H, T, D). Query i may see key j when k_pos[j] <= q_pos[i] and, with a window w,
q_pos[i] - k_pos[j] < w (a token sees itself and the w - 1 before it).

Packed rows (ctx.q_seg / ctx.k_seg given, several documents per row) are causal by index
instead, since positions restart at 0 in every document: query i sees key j when j comes no
later in the row, lies in the same document, and (window) q_pos[i] - k_pos[j] < w.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from llmkit.model.positions import PositionContext
from llmkit.registry import Registry


class AttentionKernel(Protocol):
    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: PositionContext, window: int | None, dropout_p: float
    ) -> Tensor: ...


KERNELS: Registry[AttentionKernel] = Registry("attention kernel")


def visible(ctx: PositionContext, window: int | None) -> Tensor:
    """(T, S) bool, or (B, 1, T, S) for per-row positions or packed rows: which keys each query may
    attend to."""
    offset = ctx.q_pos[..., :, None] - ctx.k_pos[..., None, :]  # (T, S) or (B, T, S)
    allowed = offset >= 0 if ctx.q_seg is None else same_document(ctx)
    if window is not None:
        allowed &= offset < window
    return allowed if allowed.dim() == 2 else allowed[:, None]


def same_document(ctx: PositionContext) -> Tensor:
    """(B, T, S) bool for packed rows: the key is no later in the row than the query (the T queries
    are the last T of the S keys) and belongs to the same document."""
    T, S = ctx.q_seg.size(-1), ctx.k_seg.size(-1)
    earlier = torch.ones(T, S, dtype=torch.bool, device=ctx.q_seg.device).tril(S - T)  # (T, S)
    return earlier & (ctx.q_seg[..., :, None] == ctx.k_seg[..., None, :])


def is_plain_causal(ctx: PositionContext, window: int | None) -> bool:
    """Plain causal attention: no bias, window or packed rows, T == S, positions shared by the batch
    (training, prefill). Fused kernels compute it from a flag instead of a mask."""
    shared_positions = ctx.q_pos.dim() == 1 and ctx.q_pos.size(0) == ctx.k_pos.size(0)
    return shared_positions and ctx.bias is None and window is None and ctx.q_seg is None


def shared_mask(ctx: PositionContext, key: tuple, build: Callable[[], Tensor]) -> Tensor:
    """A mask built once per forward and read by every layer (they share ctx): a decoding step's mask cost
    more than its attention at small batches. Compiled code builds its own (no side effects in the graph)."""
    if torch.compiler.is_compiling():
        return build()
    if key not in ctx.masks:
        ctx.masks[key] = build()
    return ctx.masks[key]


def additive_mask(ctx: PositionContext, window: int | None, dtype: torch.dtype) -> Tensor:
    """(H or 1, T, S) float, or (B, H or 1, T, S) for per-row positions or packed rows: position bias
    where visible, -inf elsewhere."""
    blocked = torch.zeros((), dtype=dtype, device=ctx.q_pos.device)
    mask = torch.where(visible(ctx, window), blocked, float("-inf"))
    return mask if ctx.bias is None else ctx.bias.to(dtype) + mask


def eager_probabilities(q: Tensor, k: Tensor, ctx: PositionContext, window: int | None) -> Tensor:
    """(B, H, T, S) attention probabilities in q's dtype (the eager kernel's; llmkit/explore records them)."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # (B, H, S, D)
    scores = (q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5  # (B, H, T, S)
    scores = scores + shared_mask(ctx, ("additive", window, scores.dtype), lambda: additive_mask(ctx, window, scores.dtype))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype)


@KERNELS.register("eager")
def eager_attention(q: Tensor, k: Tensor, v: Tensor, ctx: PositionContext, window: int | None, dropout_p: float) -> Tensor:
    """Reference kernel: materialises the (B, H, T, S) score matrix."""
    probs = F.dropout(eager_probabilities(q, k, ctx, window), p=dropout_p, training=dropout_p > 0)
    return probs @ v.repeat_interleave(q.size(1) // v.size(1), dim=1)


@KERNELS.register("sdpa")
def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, ctx: PositionContext, window: int | None, dropout_p: float) -> Tensor:
    """torch's fused kernels. Plain causal attention (see is_plain_causal) takes the is_causal fast
    path, which lets torch pick flash attention; anything else, packed rows included, passes a mask."""
    gqa = q.size(1) != k.size(1)
    if is_plain_causal(ctx, window):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    if ctx.bias is None and q.device.type != "cpu":
        mask = shared_mask(ctx, ("visible", window), lambda: visible(ctx, window))  # keeps the memory-efficient kernels
    else:  # torch's CPU kernel turns a bool mask into an additive one at each call: 116 vs 81 us at (32, 4, 1, 48)
        mask = shared_mask(ctx, ("additive", window, q.dtype), lambda: additive_mask(ctx, window, q.dtype))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


@KERNELS.register("flex")
def flex_attention_kernel(q: Tensor, k: Tensor, v: Tensor, ctx: PositionContext, window: int | None, dropout_p: float) -> Tensor:
    """torch's FlexAttention. It has no dropout, and on CPU no backward pass (torch 2.13)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if dropout_p > 0:
        raise ValueError("kernel=flex has no attention dropout; set model.dropout=0 or use kernel=sdpa")
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise NotImplementedError(
            "kernel=flex has no backward pass on CPU; train with model.attention.kernel=sdpa "
            "(flex works on CPU for inference, and for training on CUDA)"
        )
    per_row = ctx.q_pos.dim() == 2 or ctx.q_seg is not None  # masks and biases differ between rows
    batch = q.size(0) if per_row else 1
    q_pos, k_pos = (p.expand(batch, -1) for p in (ctx.q_pos, ctx.k_pos))  # (B or 1, T), (B or 1, S)
    allowed_offset = window if window is not None else q_pos.numel() + k_pos.numel() + 1

    def by_position(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        row = b if per_row else 0
        offset = q_pos[row, q_idx] - k_pos[row, kv_idx]
        return (offset >= 0) & (offset < allowed_offset)

    def by_document(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:  # packed rows
        earlier = kv_idx <= q_idx + (k.size(2) - q.size(2))  # by index: positions restart per document
        same = ctx.q_seg[b, q_idx] == ctx.k_seg[b, kv_idx]
        return earlier & same & (q_pos[b, q_idx] - k_pos[b, kv_idx] < allowed_offset)

    mask_mod = by_position if ctx.q_seg is None else by_document
    block_mask = create_block_mask(mask_mod, q.size(0) if per_row else None, None, q.size(2), k.size(2), device=q.device)
    score_mod = None
    if ctx.bias is not None:
        bias = ctx.bias.to(q.dtype)
        bias = bias.expand(q.size(0), q.size(1), -1, -1) if per_row else bias.expand(q.size(1), -1, -1)[None]

        def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return score + bias[b if per_row else 0, h, q_idx, kv_idx]

    attend = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return attend(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1))


@functools.cache
def _compiled_flex():
    """FlexAttention is only fused (fast) when compiled; compiled once per process."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@KERNELS.register("xformers")
def xformers_attention(q: Tensor, k: Tensor, v: Tensor, ctx: PositionContext, window: int | None, dropout_p: float) -> Tensor:
    """xformers' memory-efficient attention: CUDA only, installed with `pip install -e ".[xformers]"`."""
    try:
        import xformers.ops as xops
    except ImportError as err:
        raise ImportError(
            "kernel=xformers needs the optional extra: pip install -e '.[xformers]' "
            "(CUDA only); or use model.attention.kernel=sdpa"
        ) from err
    if q.device.type != "cuda":
        raise RuntimeError(
            f"kernel=xformers runs only on CUDA tensors, got device '{q.device.type}'; "
            "use model.attention.kernel=sdpa on this machine"
        )
    return _eager_xformers(xops, q, k, v, ctx, window, dropout_p)


@torch.compiler.disable
def _eager_xformers(xops, q: Tensor, k: Tensor, v: Tensor, ctx: PositionContext, window: int | None, dropout_p: float) -> Tensor:
    """Runs outside torch.compile (a graph break per call): xformers' dispatch inspects mask objects
    and operator tables in Python, which Dynamo does not trace reliably (xformers issues 720, 765, 920)."""
    groups = q.size(1) // k.size(1)
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, D): xformers' layout
    attn_bias = _xformers_bias(xops, ctx, window, q)
    try:
        out = xops.memory_efficient_attention(q, k, v, attn_bias=attn_bias, p=dropout_p)
    except NotImplementedError as err:  # installed, but its CUDA kernels were built for another torch
        raise RuntimeError(
            f"xformers is installed but has no usable CUDA kernel for these inputs (torch {torch.__version__}; "
            "an xformers wheel only works with the torch it was built for): install the xformers release "
            "matching this torch, or use model.attention.kernel=sdpa"
        ) from err
    return out.transpose(1, 2)  # (B, H, T, D)


def _xformers_bias(xops, ctx: PositionContext, window: int | None, q: Tensor):
    """Causal and (in half precision) sliding-window masks as xformers' mask objects, which its kernels
    compute from a flag; anything else (position bias, packed rows, per-row positions) as a materialised bias."""
    if is_plain_causal(ctx, None):
        if window is None:
            return xops.LowerTriangularMask()
        # Only flash (fp16/bf16) has a backward for the local mask (xformers' cutlass one is disabled
        # for it); T == S here, so the bottom-right alignment is the top-left one.
        if q.dtype in (torch.float16, torch.bfloat16):
            return xops.fmha.attn_bias.LowerTriangularFromBottomRightLocalAttentionMask(window)
    return _aligned_bias(additive_mask(ctx, window, q.dtype), q.size(0), q.size(2))


def _aligned_bias(mask: Tensor, batch: int, heads: int) -> Tensor:
    """xformers wants a (B, H, T, S) bias whose row stride is a multiple of 8."""
    t, s = mask.shape[-2:]
    padded = torch.empty(batch, heads, t, (s + 7) // 8 * 8, dtype=mask.dtype, device=mask.device)
    view = padded[..., :s]
    view.copy_(mask.expand(batch, heads, t, s))
    return view

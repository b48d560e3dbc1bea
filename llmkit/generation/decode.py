"""Decoders: next-token logits for a batch of token sequences, extended one token per row per step.

`CachedDecoder` runs the model's own forward, with every block's attention swapped, for the length
of one call, for a `CachedAttention` that uses the same weights and kernel and reads and extends a
KV cache. The training forward never sees a cache (DESIGN.md, section 3). `RecomputeDecoder` runs
the plain forward over every whole sequence each step: the reference the cache is tested against.

Both run in eval mode without gradients, and eagerly even when the blocks are compiled (shapes
change every step, which would recompile), through the model's `__call__` so FSDP's hooks gather
the sharded parameters: every rank must then decode the same steps.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Protocol

import torch
from torch import Tensor, nn

from llmkit.generation.cache import KVCache, SlidingWindowCache
from llmkit.model import Transformer
from llmkit.model.positions import PositionContext


class Decoder(Protocol):
    """What the sampling loop drives: the prompts of every row, then one token per row per step, each call
    returning (B, V) float logits of every row's next token."""

    def prefill(self, contexts: list[list[int]]) -> Tensor: ...

    def step(self, tokens: list[int]) -> Tensor: ...


class CachedAttention(nn.Module):
    """Stands in for a block's attention: same call, same weights and kernel, keys from the cache."""

    def __init__(self, attention: nn.Module, cache: KVCache, layer: int) -> None:
        super().__init__()
        self.attention, self.cache, self.layer = attention, cache, layer

    def forward(self, x: Tensor, ctx: PositionContext) -> Tensor:
        attention = self.attention
        q, k, v = attention.project(x, ctx)  # the new tokens only, rotated at their own positions
        k, v = self.cache.update(self.layer, k, v)  # (B, Hkv, S, D): cached and new
        y = attention.kernel(q, k, v, self.cache.context(), attention.window, 0.0)  # (B, H, T, D)
        return attention.output(y)


@contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, compiled modules run eagerly; the training mode is restored after."""
    was_training = model.training
    if was_training:  # train(mode) walks every module: skipped when already in eval mode
        model.eval()
    try:
        with torch.no_grad(), _eager():
            yield
    finally:
        if was_training:
            model.train()


def _eager():
    """Compiled modules run eagerly. Nothing can be compiled before dynamo is imported, and importing
    it just for this takes over a second, so it is left alone until then."""
    return torch.compiler.set_stance("force_eager") if "torch._dynamo" in sys.modules else nullcontext()


def _device(model: Transformer) -> torch.device:
    return model.head.weight.device


class CachedDecoder:
    """`prefill` runs every prompt in one forward (left-padded to the longest), filling a new cache;
    each `step` then runs one token per row at the next position of its row, `extend` several.

    with_grad=True: the model's forward as it is (its mode, gradients kept, through the cache too):
    a training forward that runs a shared prompt once (llmkit/posttrain/grouped.py). reserve: the
    tokens a row will reach, when known, so that the cache never grows."""

    def __init__(self, model: Transformer, with_grad: bool = False, reserve: int = 0) -> None:
        windows = {block.attention.window for block in model.blocks}
        if len(windows) > 1:
            raise NotImplementedError(f"layers with different attention windows {windows} need one cache each")
        self.model, self.window, self.with_grad = model, windows.pop(), with_grad
        self.reserve = reserve  # the cache's first capacity, in tokens (KVCache)
        self.next_pos = torch.empty(0)

    def prefill(self, contexts: list[list[int]]) -> Tensor:
        """contexts: token ids of each row -> (B, V) logits of each row's next token."""
        device, lengths = _device(self.model), [len(c) for c in contexts]
        longest = max(lengths)
        ids = torch.tensor([[0] * (longest - len(c)) + c for c in contexts], device=device)  # (B, P)
        positions = torch.arange(longest, device=device)  # (P,): shared when the rows are aligned
        if min(lengths) == longest:
            mask_positions, self.next_pos = positions, torch.tensor([longest], device=device)
        else:  # per row; padding embeds as position 0 but is masked as one no query reaches
            row_lengths = torch.tensor(lengths, device=device)
            positions = positions - (longest - row_lengths)[:, None]  # (B, P), negative on padding
            mask_positions = positions.masked_fill(positions < 0, self.model.cfg.max_seq_len)
            positions, self.next_pos = positions.clamp(min=0), row_lengths[:, None]
        position = self.model.position
        if self.window is None:
            self.cache: KVCache = KVCache(position, limit=self.model.cfg.max_seq_len, reserve=self.reserve)
        else:
            self.cache = SlidingWindowCache(position, self.window)
        self.attention = cached_attention(self.model, self.cache)
        return self._forward(ids, positions, mask_positions)

    def repeat_rows(self, times: int) -> None:
        """After a prefill: each row becomes `times` consecutive rows that decode on independently."""
        self.select_rows(torch.arange(self.cache.rows(), device=self.next_pos.device).repeat_interleave(times))

    def select_rows(self, index: Tensor) -> None:
        """Keep decoding only the rows `index` (B',), in that order (the others have stopped)."""
        self.cache.select_rows(index)
        if self.next_pos.dim() == 2:  # (B, 1) per-row positions
            self.next_pos = self.next_pos.index_select(0, index)

    def step(self, tokens: list[int] | Tensor) -> Tensor:
        """tokens: the next token of each row -> (B, V) logits of the token after it."""
        ids = torch.as_tensor(tokens, device=_device(self.model))[:, None]  # (B, 1)
        positions, self.next_pos = self.next_pos, self.next_pos + 1  # (1,) or (B, 1)
        return self._forward(ids, positions, positions)

    def extend(self, ids: Tensor) -> Tensor:
        """ids: (B, C) the next C tokens of every row -> (B, C, V) float logits of the token after each."""
        positions = self.next_pos + torch.arange(ids.size(1), device=ids.device)  # (C,) or (B, C)
        self.next_pos = positions[..., -1:] + 1
        return self._forward(ids, positions, positions, last_only=False)

    def _forward(self, ids: Tensor, positions: Tensor, mask_positions: Tensor, last_only: bool = True) -> Tensor:
        self.cache.begin(mask_positions)
        return forward_cached(self.model, self.attention, ids, positions, last_only, self.with_grad)


def cached_attention(model: Transformer, cache: KVCache) -> list[CachedAttention]:
    """One stand-in per block, all reading and extending `cache`."""
    return [CachedAttention(block.attention, cache, i) for i, block in enumerate(model.blocks)]


def forward_cached(
    model: Transformer, attention: list[CachedAttention], ids: Tensor, positions: Tensor, last_only: bool = True,
    with_grad: bool = False,
) -> Tensor:
    """(B, T) ids at positions -> (B, V) float logits of each row's last token (last_only=False: (B, T, V)),
    with every block's attention swapped for its cached stand-in for this one call (the cache's `begin`
    comes first); in eval mode without gradients unless with_grad. llmkit/serve's engine drives its own
    batch cache through this too."""
    blocks = model.blocks
    originals = [block.attention for block in blocks]
    try:
        for block, cached in zip(blocks, attention, strict=True):
            block.attention = cached
        with nullcontext() if with_grad else inference(model):
            logits = model(ids, positions=positions)  # (B, T, V)
            return (logits[:, -1] if last_only else logits).float()
    finally:
        for block, original in zip(blocks, originals, strict=True):
            block.attention = original


class RecomputeDecoder:
    """No cache: every step runs the training forward over each row's whole sequence (rows of
    different lengths one at a time, so no padding is involved). The reference for the tests and
    the baseline of scripts/bench_generate.py."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.contexts: list[list[int]] = []

    def prefill(self, contexts: list[list[int]]) -> Tensor:
        self.contexts = [list(c) for c in contexts]
        return self._logits()

    def step(self, tokens: list[int]) -> Tensor:
        for context, token in zip(self.contexts, tokens, strict=True):
            context.append(token)
        return self._logits()

    def _logits(self) -> Tensor:
        device = _device(self.model)
        with inference(self.model):
            if len({len(c) for c in self.contexts}) == 1:
                return self.model(torch.tensor(self.contexts, device=device))[:, -1].float()
            rows = [self.model(torch.tensor([c], device=device))[:, -1] for c in self.contexts]
            return torch.cat(rows).float()

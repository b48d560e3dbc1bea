"""Key/value caches for incremental decoding. Only llmkit.generation uses them; training never does.

The rows of a batch decode in lockstep, so column c of every layer's cache holds one token of every
row. Prompts of different lengths are left-padded: a padding column carries a position later than
any query (the model's max_seq_len), so the ordinary causal rule (kernels.visible) hides it.
Keys are stored after RoPE has rotated them at their own positions; the positions kept next to
them are all the mask and the ALiBi / T5 biases need.

A step is `begin(positions of the new tokens)`, then `update(layer, k, v)` from each layer, which
stores the layer's new keys and values and returns all of them for the attention to read.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmkit.model.positions import PositionContext, PositionScheme


class KVCache:
    """Every key and value so far, in buffers that double when full (never past `limit` columns)."""

    def __init__(self, position: PositionScheme, limit: int, reserve: int = 0) -> None:
        self.position, self.limit = position, limit
        self.reserve = min(reserve, limit)  # columns the first buffers hold: a caller that knows the final
        # length (prompt + new tokens) spares every doubling's copy of the whole cache
        self.pos: Tensor | None = None  # (capacity,) or (B, capacity): position of each column
        self.keys: dict[int, Tensor] = {}  # layer -> (B, Hkv, capacity, D)
        self.values: dict[int, Tensor] = {}
        self.start = self.length = 0  # this step's tokens fill columns [start, length)
        self.q_pos = self.k_pos = torch.empty(0)
        self._ctx: PositionContext | None = None

    def begin(self, q_pos: Tensor) -> None:
        """Start a step whose new tokens sit at q_pos: (T,) shared by the rows, or (B, T)."""
        self.start, self.length = self.length, self.length + q_pos.size(-1)
        self.pos = self._room(self.pos, q_pos, dim=-1)
        self.pos[..., self.start : self.length] = q_pos
        self.q_pos, self.k_pos, self._ctx = q_pos, self.pos[..., : self.length], None

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store one layer's new keys and values (B, Hkv, T, D); return all of them (B, Hkv, S, D)."""
        self.keys[layer] = keys = self._room(self.keys.get(layer), k, dim=2)
        self.values[layer] = values = self._room(self.values.get(layer), v, dim=2)
        keys[:, :, self.start : self.length] = k
        values[:, :, self.start : self.length] = v
        return keys[:, :, : self.length], values[:, :, : self.length]

    def repeat_rows(self, times: int) -> None:
        """Every row `times` times, consecutively (row i becomes rows [i * times, (i + 1) * times)): one
        prefill of a prompt serves all the completions sampled from it."""
        self.select_rows(torch.arange(self.rows(), device=self.q_pos.device).repeat_interleave(times))

    def rows(self) -> int:
        """The batch's rows (after a first step)."""
        return next(iter(self.keys.values())).size(0)

    def select_rows(self, index: Tensor) -> None:
        """Keep the rows `index` (B',) in that order, each as often as it appears: the rows still decoding once
        others have stopped, or each row repeated."""
        for store in (self.keys, self.values):
            for layer, buffer in store.items():
                store[layer] = _select_filled(buffer, index, self._filled(), dim=2)  # (B', Hkv, capacity, D)
        if self.pos is not None and self.pos.dim() == 2:
            self.pos = _select_filled(self.pos, index, self._filled(), dim=1)
        self._ctx = None

    def _filled(self) -> int:
        """Columns of the buffers written so far."""
        return self.length

    def context(self) -> PositionContext:
        """Mask and bias of this step's queries over every key (no rotary: keys are stored rotated).
        Built at the first layer's call, inside the model's forward, where FSDP has gathered the
        parameters of the position scheme (T5's bias table); shared by every layer."""
        if self._ctx is None:
            self._ctx = self.position.attention_context(self.q_pos, self.k_pos)
        return self._ctx

    def _room(self, buffer: Tensor | None, new: Tensor, dim: int) -> Tensor:
        """`buffer`, or a copy with twice its columns along `dim`, so that `self.length` fit."""
        if buffer is not None and buffer.size(dim) >= self.length:
            return buffer
        old = 0 if buffer is None else buffer.size(dim)
        shape = list(new.shape)
        shape[dim] = max(self.length, min(2 * old, self.limit), self.reserve)
        grown = new.new_empty(shape)
        if buffer is not None:
            grown.narrow(dim, 0, self.start).copy_(buffer.narrow(dim, 0, self.start))
        return grown


class SlidingWindowCache(KVCache):
    """Keeps only the last `window` columns: no later query can see a key further back. A step
    attends over those plus its new tokens, so a prefill of T tokens briefly reads window + T."""

    def __init__(self, position: PositionScheme, window: int) -> None:
        super().__init__(position, limit=window)
        self.window = window

    def begin(self, q_pos: Tensor) -> None:
        k_pos = q_pos if self.pos is None else torch.cat([self.pos, q_pos], dim=-1)
        self.pos = k_pos[..., -self.window :]
        self.q_pos, self.k_pos, self._ctx = q_pos, k_pos, None

    def _filled(self) -> int:
        return 0 if self.pos is None else self.pos.size(-1)  # every column it keeps

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if layer in self.keys:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k[:, :, -self.window :], v[:, :, -self.window :]
        return k, v


def _select_filled(buffer: Tensor, index: Tensor, filled: int, dim: int) -> Tensor:
    """The rows `index` of buffer, in a buffer of the same capacity along `dim`, of which only the first
    `filled` columns are copied."""
    out = buffer.new_empty(index.numel(), *buffer.shape[1:])
    out.narrow(dim, 0, filled).copy_(buffer.narrow(dim, 0, filled).index_select(0, index))
    return out

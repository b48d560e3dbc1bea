"""A KV cache whose rows come and go: the server's running batch.

llmkit/generation's KVCache decodes rows in lockstep, column c holding one token of every row, rows
left-padded. Here a row joins after its own prefill (a one-row KVCache) and leaves when it finishes,
while the others keep decoding. Every row stays right-aligned: its tokens fill the last columns,
and the columns before them are padding at a position no query reaches (the model's max_seq_len,
as in KVCache), so the ordinary causal rule hides them. Positions are per row, (B, columns).

    join(one_row)  a new last row; if its prompt is longer than the batch's columns, every other
                   row is shifted right first (padding added on the left)
    drop(rows)     removes rows, then the leading columns that are padding in every row left

So the number of columns is the longest live row, never more than max_seq_len.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmkit.generation.cache import KVCache


class BatchCache(KVCache):
    """KVCache with per-row positions whose rows join and leave between steps."""

    @property
    def rows(self) -> int:
        return 0 if self.pos is None else self.pos.size(0)

    def join(self, single: KVCache) -> None:
        """Append the one row of `single` (a prefilled KVCache) as the last row."""
        width = single.length
        new_pos = single.pos[..., :width].reshape(1, width)  # (1, P): shared (P,) positions become one row
        if self.pos is None or self.rows == 0:
            self._adopt(single, new_pos)
            return
        if width > self.length:
            self._pad_left(width - self.length)
        start = self.length - width
        pos = self.pos.new_full((1, self.pos.size(1)), self.limit)
        pos[:, start : self.length] = new_pos
        self.pos = torch.cat([self.pos, pos])
        for layer in self.keys:
            self.keys[layer] = self._joined(self.keys[layer], single.keys[layer][:, :, :width], start)
            self.values[layer] = self._joined(self.values[layer], single.values[layer][:, :, :width], start)

    def drop(self, rows: list[int]) -> None:
        """Remove these row indices; then trim the columns every remaining row has as padding."""
        keep = [r for r in range(self.rows) if r not in set(rows)]
        if not keep:
            self.pos, self.keys, self.values, self.start, self.length = None, {}, {}, 0, 0
            return
        index = torch.tensor(keep, device=self.pos.device)
        self.pos = self.pos.index_select(0, index)
        for layer in self.keys:
            self.keys[layer] = self.keys[layer].index_select(0, index)
            self.values[layer] = self.values[layer].index_select(0, index)
        real = (self.pos[:, : self.length] != self.limit).any(dim=0)  # (columns,): a token of some row
        lead = int(real.int().argmax()) if bool(real.any()) else self.length
        if lead:
            self._trim_left(lead)

    def _adopt(self, single: KVCache, pos: Tensor) -> None:
        width = single.length
        self.pos = pos.clone()
        self.keys = {layer: k[:, :, :width].clone() for layer, k in single.keys.items()}
        self.values = {layer: v[:, :, :width].clone() for layer, v in single.values.items()}
        self.start = self.length = width

    def _joined(self, batch: Tensor, row: Tensor, start: int) -> Tensor:
        """batch (B, Hkv, cap, D) + row (1, Hkv, P, D) placed at columns [start, start + P)."""
        new = batch.new_zeros((1, *batch.shape[1:]))
        new[:, :, start : start + row.size(2)] = row
        return torch.cat([batch, new])

    def _pad_left(self, columns: int) -> None:
        self.pos = torch.cat([self.pos.new_full((self.rows, columns), self.limit), self.pos[:, : self.length]], dim=1)
        for store in (self.keys, self.values):
            for layer, t in store.items():
                pad = t.new_zeros((t.size(0), t.size(1), columns, t.size(3)))
                store[layer] = torch.cat([pad, t[:, :, : self.length]], dim=2)
        self.start = self.length = self.length + columns

    def _trim_left(self, columns: int) -> None:
        self.pos = self.pos[:, columns : self.length].contiguous()
        for store in (self.keys, self.values):
            for layer, t in store.items():
                store[layer] = t[:, :, columns : self.length].contiguous()
        self.start = self.length = self.length - columns

"""What runs the forwards under the serving engine: llmkit's own model, or an ONNX Runtime session.

The engine (engine.py) schedules; a runner owns the running batch's KV cache and answers three calls:

    prefill(prompt)      one request's prompt alone -> (1, V) logits, and the row's cache, not yet in the batch
    join(row)            that row becomes the batch's last row
    decode(tokens, pos)  one token of every row at its position -> (B, V) float logits
    drop(rows)           rows leave (finished, cancelled, failed)

The runner is chosen by the model the server loaded (`runner_for`), never inside a step.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from llmkit.generation.cache import KVCache
from llmkit.generation.decode import cached_attention, forward_cached
from llmkit.model import ModelConfig, Transformer
from llmkit.onnx import OnnxModel, io_names
from llmkit.serve.batch_cache import BatchCache


class Runner(Protocol):
    cfg: ModelConfig

    def prefill(self, prompt: list[int]) -> tuple[Tensor, Any]: ...

    def join(self, row: Any) -> None: ...

    def decode(self, tokens: list[int], positions: list[int]) -> Tensor: ...

    def drop(self, rows: list[int]) -> None: ...


class TorchRunner:
    """llmkit's model with its batch cache (batch_cache.py): rows right-aligned, padding masked by position."""

    def __init__(self, model: Transformer) -> None:
        self.model, self.cfg = model, model.cfg
        self.device = model.head.weight.device
        self.cache = BatchCache(model.position, limit=model.cfg.max_seq_len)
        self.attention = cached_attention(model, self.cache)

    def prefill(self, prompt: list[int]) -> tuple[Tensor, KVCache]:
        single = KVCache(self.model.position, limit=self.cfg.max_seq_len)
        ids = torch.tensor([prompt], device=self.device)  # (1, P)
        positions = torch.arange(len(prompt), device=self.device)  # (P,)
        single.begin(positions)
        return forward_cached(self.model, cached_attention(self.model, single), ids, positions), single  # (1, V)

    def join(self, row: KVCache) -> None:
        self.cache.join(row)

    def decode(self, tokens: list[int], positions: list[int]) -> Tensor:
        ids = torch.tensor(tokens, device=self.device)[:, None]  # (B, 1)
        pos = torch.tensor(positions, device=self.device)[:, None]  # (B, 1)
        self.cache.begin(pos)
        return forward_cached(self.model, self.attention, ids, pos)  # (B, V)

    def drop(self, rows: list[int]) -> None:
        self.cache.drop(rows)


class OnnxRunner:
    """An exported decoder (llmkit/onnx.py) on ONNX Runtime. The batch's past keys and values are numpy
    arrays (B, Hkv, S, D), rows left-padded with attention_mask 0; the graph returns them extended by a column."""

    def __init__(self, onnx: OnnxModel) -> None:
        self.onnx, self.cfg = onnx, onnx.cfg
        self.inputs, self.outputs = io_names(onnx.cfg.n_layers)
        self.past: list[np.ndarray] = []
        self.mask = np.zeros((0, 0), dtype=np.int64)

    def _run(self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]) -> tuple[Tensor, list[np.ndarray]]:
        T = ids.shape[1]
        positions = (mask.cumsum(-1) - 1)[:, -T:].clip(min=0)  # (B, T), Optimum's position_ids
        logits, *present = self.onnx.session.run(self.outputs, dict(zip(self.inputs, [ids, mask, positions, *past], strict=True)))
        return torch.from_numpy(logits[:, -1]).float(), present  # (B, V)

    def prefill(self, prompt: list[int]) -> tuple[Tensor, tuple[np.ndarray, list[np.ndarray]]]:
        empty = np.zeros((1, self.onnx.n_kv_heads, 0, self.onnx.head_dim), dtype=np.float32)
        mask = np.ones((1, len(prompt)), dtype=np.int64)
        logits, present = self._run(np.array([prompt], dtype=np.int64), mask, [empty] * (2 * self.cfg.n_layers))
        return logits, (mask, present)

    def join(self, row: tuple[np.ndarray, list[np.ndarray]]) -> None:
        mask, past = row
        if not self.past:
            self.mask, self.past = mask, past
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = np.concatenate([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.past = [np.concatenate([_pad_left(batch, width, 2), _pad_left(new, width, 2)])
                     for batch, new in zip(self.past, past, strict=True)]

    def decode(self, tokens: list[int], positions: list[int]) -> Tensor:
        # positions follow from the mask (each row counts its own tokens), equal to the engine's by construction
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), dtype=np.int64)], axis=1)
        logits, self.past = self._run(np.array(tokens, dtype=np.int64)[:, None], self.mask, self.past)
        return logits

    def drop(self, rows: list[int]) -> None:
        keep = [r for r in range(self.mask.shape[0]) if r not in set(rows)]
        if not keep:
            self.mask, self.past = np.zeros((0, 0), dtype=np.int64), []
            return
        mask = self.mask[keep]
        lead = int(mask.any(axis=0).argmax())  # columns that are padding in every remaining row
        self.mask = mask[:, lead:]
        self.past = [p[keep][:, :, lead:] for p in self.past]


def _pad_left(array: np.ndarray, width: int, axis: int) -> np.ndarray:
    pad = [(0, 0)] * array.ndim
    pad[axis] = (width - array.shape[axis], 0)
    return np.pad(array, pad)


def runner_for(model: Transformer | OnnxModel) -> Runner:
    return OnnxRunner(model) if isinstance(model, OnnxModel) else TorchRunner(model)

"""The update's forward over a rollout's N = B x G rows [prompt, completion], each prompt run once for its group.

The G rows of a group share their prompt, so its keys and values are the same in all of them. The B
prompts go through the model once, filling a KV cache (llmkit/generation/decode.py, with gradients),
whose rows are then repeated G times, and the N completions go through it attending to their prompt
in the cache: the function of the plain forward of the N rows, with gradients through both passes,
for a prompt's compute paid once per group rather than G times.

The logits come back in the rollout's layout, (N, T, V) over [prompt, completion] where the labels score
them (elsewhere 0), so the losses read them as they read the plain forward's. Where a cache cannot stand
in for the training forward, `policy_logits` runs the plain forward instead: compiled blocks (swapping
their attention would recompile them), activation checkpointing (a block recomputed in the backward would
write the cache again), FSDP (two forwards before one backward), dropout (the cached attention has none),
layers of different attention windows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmkit.generation.decode import CachedDecoder
from llmkit.model import Transformer
from llmkit.posttrain.packing import IGNORE


def policy_logits(model: Transformer, ids: Tensor, labels: Tensor, group: int) -> Tensor:
    """(N, T) ids and labels of a rollout whose rows come in groups of `group` sharing a prompt -> (N, T, V)
    logits wherever the labels score them (each prompt run once, when the model allows it)."""
    if group > 1 and ids.size(0) % group == 0 and runs_groups(model):
        return grouped_logits(model, ids, labels, group)
    return model(ids)


def runs_groups(model: Transformer) -> bool:
    """Whether a KV cache can stand in for the model's training forward (see the module's docstring)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule) or (model.training and model.cfg.dropout > 0):
        return False
    if any(type(m).__name__ == "CheckpointWrapper" for m in model.modules()):  # llmkit/recompute.py's wrapper
        return False
    compiled = any(getattr(block, "_compiled_call_impl", None) is not None for block in model.blocks)
    return not compiled and len({block.attention.window for block in model.blocks}) == 1


def grouped_logits(model: Transformer, ids: Tensor, labels: Tensor, group: int) -> Tensor:
    """As `model(ids)` at the scored positions; rows [g * group, (g + 1) * group) must share their prompt."""
    rows, width = ids.shape
    scored = labels != IGNORE  # (N, T): the completion tokens, predicted from position p - 1 on
    first = scored.int().argmax(dim=1)  # (N,) the prompt's last position, which predicts the first token
    lengths = scored.sum(dim=1)  # (N,) completion tokens (>= 1: a rollout samples at least one)
    span = int(lengths.max())
    heads = range(0, rows, group)
    prompts = [ids[r, : int(first[r]) + 1].tolist() for r in heads]
    offsets = torch.arange(span, device=ids.device)
    decoder = CachedDecoder(model, with_grad=True, reserve=max(map(len, prompts)) + span)
    logits = decoder.prefill(prompts).repeat_interleave(group, dim=0)[:, None]  # (N, 1, V): the first token's
    decoder.repeat_rows(group)
    if span > 1:  # the completions but their last token, each predicting the next one
        tokens = ids.gather(1, (first[:, None] + 1 + offsets[: span - 1]).clamp(max=width - 1))  # (N, span - 1)
        logits = torch.cat([logits, decoder.extend(tokens)], dim=1)  # (N, span, V)
    valid = offsets[None, :] < lengths[:, None]  # (N, span): a padding slot of a shorter completion is not
    out = logits.new_zeros(rows, width, logits.size(-1))
    row_index = torch.arange(rows, device=ids.device)[:, None].expand(-1, span)
    out[row_index[valid], (first[:, None] + offsets)[valid]] = logits[valid]
    return out

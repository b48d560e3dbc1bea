"""The update's forward over a rollout's N = B x G rows [prompt, completion], each prompt run once for its group.

The G rows of a group share their prompt, so its keys and values are the same in all of them. The B
prompts go through the model once, filling a KV cache (llmkit/generation/decode.py, with gradients),
whose rows are then repeated G times, and the N completions go through it attending to their prompt
in the cache: the function of the plain forward of the N rows, with gradients through both passes,
for a prompt's compute paid once per group rather than G times.

The logits come back only at the completions, (N, S, V) for the longest completion S, with the columns
each lands in within the rollout's (N, T) layout (`ScoredLogits`): the log-softmax, its backward and the
entropy then run over S positions, not T (about half of them, the prompt's, unscored), and the per-token
log-probs go back into the (N, T) layout the losses read, as the plain forward's do. Where a cache cannot stand
in for the training forward, `policy_logits` runs the plain forward instead: compiled blocks (swapping
their attention would recompile them), activation checkpointing (a block recomputed in the backward would
write the cache again), FSDP (two forwards before one backward), dropout (the cached attention has none),
layers of different attention windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmkit.generation.decode import CachedDecoder
from llmkit.model import Transformer
from llmkit.posttrain.packing import IGNORE
from llmkit.posttrain.rl_losses import token_entropy, token_logprobs


@dataclass
class ScoredLogits:
    """An update forward's logits where a rollout's labels score them: the plain forward's (N, T, V) in the
    rollout's layout (columns None), or the grouped forward's (N, S, V) at the completions only, row i's
    slot j landing in column columns[i, j] of the (N, T) layout."""

    logits: Tensor  # (N, S, V)
    labels: Tensor  # (N, S): IGNORE where nothing is scored
    columns: Tensor | None = None  # (N, S)
    width: int = 0  # the layout's T

    def logprobs(self, temperature: float = 1.0) -> Tensor:
        """(N, T) float32 log p(label) of logits / temperature in the rollout's layout, 0 where unscored."""
        logps = token_logprobs(self.logits, self.labels, temperature)  # (N, S), 0 where unscored
        if self.columns is None:
            return logps
        # an unscored slot may share a column with a scored one (clamped at the last column): it adds 0 there
        return logps.new_zeros(logps.size(0), self.width).scatter_add(1, self.columns, logps)

    def entropy(self, temperature: float = 1.0) -> Tensor:
        """Mean entropy of the sampling distribution over the scored tokens."""
        return token_entropy(self.logits, self.labels != IGNORE, temperature)


def policy_logits(model: Transformer, ids: Tensor, labels: Tensor, group: int) -> ScoredLogits:
    """(N, T) ids and labels of a rollout whose rows come in groups of `group` sharing a prompt -> the logits
    wherever the labels score them (each prompt run once, when the model allows it)."""
    if group > 1 and ids.size(0) % group == 0 and runs_groups(model):
        return grouped_logits(model, ids, labels, group)
    return ScoredLogits(model(ids), labels)


def runs_groups(model: Transformer) -> bool:
    """Whether a KV cache can stand in for the model's training forward (see the module's docstring)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule) or (model.training and model.cfg.dropout > 0):
        return False
    if any(type(m).__name__ == "CheckpointWrapper" for m in model.modules()):  # llmkit/recompute.py's wrapper
        return False
    compiled = any(getattr(block, "_compiled_call_impl", None) is not None for block in model.blocks)
    return not compiled and len({block.attention.window for block in model.blocks}) == 1


def grouped_logits(model: Transformer, ids: Tensor, labels: Tensor, group: int) -> ScoredLogits:
    """As `model(ids)` at the scored positions; rows [g * group, (g + 1) * group) must share their prompt."""
    rows, width = ids.shape
    scored = labels != IGNORE  # (N, T): the completion tokens, predicted from position p - 1 on
    first = scored.int().argmax(dim=1)  # (N,) the prompt's last position, which predicts the first token
    lengths = scored.sum(dim=1)  # (N,) completion tokens (>= 1: a rollout samples at least one)
    span = int(lengths.max())
    prompts = [ids[r, : int(first[r]) + 1].tolist() for r in range(0, rows, group)]
    offsets = torch.arange(span, device=ids.device)
    columns = (first[:, None] + offsets).clamp(max=width - 1)  # (N, span): past a shorter completion, unscored
    decoder = CachedDecoder(model, with_grad=True, reserve=max(map(len, prompts)) + span)
    logits = decoder.prefill(prompts).repeat_interleave(group, dim=0)[:, None]  # (N, 1, V): the first token's
    decoder.repeat_rows(group)
    if span > 1:  # the completions but their last token, each predicting the next one
        tokens = ids.gather(1, (columns[:, : span - 1] + 1).clamp(max=width - 1))  # (N, span - 1)
        logits = torch.cat([logits, decoder.extend(tokens)], dim=1)  # (N, span, V)
    valid = offsets[None, :] < lengths[:, None]  # (N, span): a padding slot of a shorter completion is not
    return ScoredLogits(logits, labels.gather(1, columns).masked_fill(~valid, IGNORE), columns, width)

"""Perplexity with a strided sliding window (as in the Hugging Face perplexity guide).

Windows of at most `context` tokens end every `stride` tokens; each window scores only the targets
that no earlier window scored, so every token after the first is scored exactly once, with at least
context - stride tokens of left context (all of it, near the start). stride == context is plain
non-overlapping chunks; stride 1 gives every token the full window (slowest, lowest perplexity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from llmkit.model import Transformer


@dataclass
class Perplexity:
    tokens: int  # targets scored
    nll: float  # mean negative log-likelihood per scored token (nats)
    ppl: float
    context: int
    stride: int
    windows: int

    def to_dict(self) -> dict[str, float | int]:
        return dict(tokens=self.tokens, nll=self.nll, ppl=self.ppl, context=self.context, stride=self.stride,
                    windows=self.windows)


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) per window: input ids[begin:end] predicts ids[begin+1:end+1], of which the
    targets first..end (inclusive indices into ids) are scored."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), got {stride}")
    out, scored = [], 0  # targets 1..scored are done
    while scored < n_tokens - 1:
        end = min(scored + stride if out else context, n_tokens - 1)
        out.append((max(0, end - context), end, scored + 1))
        scored = end
    return out


@torch.no_grad()
def perplexity(
    model: Transformer, ids: Tensor, context: int | None = None, stride: int | None = None, batch_size: int = 8,
) -> Perplexity:
    """ids: (N,) token ids. context defaults to model.cfg.max_seq_len, stride to context // 2."""
    context = context or model.cfg.max_seq_len
    stride = stride or max(1, context // 2)
    total, count, n_windows = nll_sum(model, ids, context, stride, batch_size)
    mean = total / count
    return Perplexity(tokens=count, nll=mean, ppl=math.exp(mean), context=context, stride=stride, windows=n_windows)


@torch.no_grad()
def nll_sum(model: Transformer, ids: Tensor, context: int, stride: int, batch_size: int = 8) -> tuple[float, int, int]:
    """Summed negative log-likelihood of ids[1:] (fp64 accumulation), the number of targets and of windows."""
    if context > model.cfg.max_seq_len:
        raise ValueError(f"context {context} exceeds model.max_seq_len={model.cfg.max_seq_len}")
    if ids.numel() < 2:
        raise ValueError("need at least two tokens to score one")
    device = next(model.parameters()).device
    ids = ids.long().to(device)
    spans = windows(ids.numel(), context, stride)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:  # all windows but a short first one have the same length: batch them
        by_length.setdefault(span[1] - span[0], []).append(span)
    for length, group in by_length.items():
        for i in range(0, len(group), batch_size):
            batch = group[i : i + batch_size]
            inputs = torch.stack([ids[b:e] for b, e, _ in batch])  # (B, L)
            targets = torch.stack([ids[b + 1 : e + 1] for b, e, _ in batch])  # (B, L)
            logits = model(inputs).float()
            nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(len(batch), length)
            target_index = torch.arange(1, length + 1, device=device)  # target j of a window is ids[b + j]
            keep = torch.stack([(b + target_index) >= first for b, _, first in batch])
            total += nll[keep].double().sum()
            count += int(keep.sum())
    model.pop_aux_losses()  # MoE layers record auxiliary losses on every forward
    model.pop_metrics()
    return float(total), count, len(spans)

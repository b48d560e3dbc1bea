"""One instrumented forward of a trained model: what the internals explorer page shows, as plain data.

Every attention layer runs the eager kernel's math (tests/model/test_attention.py holds it equal to
sdpa) through a recording wrapper that keeps the probabilities; forward hooks read the residual
stream after each block and the MoE routers' choices. Nothing in the model changes: the wrapper is
put in place for the forward and taken away after it, so the logits are the model's own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llmkit.model import Transformer
from llmkit.model.kernels import eager_probabilities
from llmkit.model.positions import PositionContext


@dataclass
class Trace:
    tokens: list[str]  # the text of each token
    ids: list[int]
    attention: Tensor  # (L, H, T, T) probabilities, rows sum to 1
    logits: Tensor  # (T, V)
    lens: Tensor  # (L, T, V) logit lens: each block's output through the final norm and the head
    residual_norms: Tensor  # (L + 1, T): norms of the residual stream into block 0 (embeddings + positions) and after each block
    routing: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # layer -> experts, weights (T, k)


class RecordingKernel:
    """The eager kernel's math (no dropout: the model is evaluating), keeping each call's (B, H, T, S) probabilities."""

    def __init__(self) -> None:
        self.probs: Tensor | None = None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: PositionContext, window: int | None, dropout_p: float) -> Tensor:
        probs = eager_probabilities(q, k, ctx, window)
        self.probs = probs.float()
        return probs @ v.repeat_interleave(q.size(1) // v.size(1), dim=1)


@contextlib.contextmanager
def recording(model: Transformer) -> Iterator[list[RecordingKernel]]:
    """Every attention layer's kernel replaced by a recorder for the duration (one per layer)."""
    recorders, saved = [], []
    for block in model.blocks:
        recorder = RecordingKernel()
        saved.append(block.attention.kernel)
        block.attention.kernel = recorder
        recorders.append(recorder)
    try:
        yield recorders
    finally:
        for block, kernel in zip(model.blocks, saved, strict=True):
            block.attention.kernel = kernel


@torch.no_grad()
def trace(model: Transformer, ids: list[int], decode: Any = None) -> Trace:
    """Run `ids` (one sequence) through `model` with every internal the page shows recorded."""
    model = model.eval()
    device = next(model.parameters()).device
    idx = torch.tensor([ids], device=device)  # (1, T)
    outputs: list[Tensor] = []
    routing: dict[int, dict[str, Tensor]] = {}
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, args: outputs.append(args[0][0]))]  # the residual stream in
    hooks += [block.register_forward_hook(lambda m, args, out: outputs.append(out[0])) for block in model.blocks]
    for layer, router in _routers(model):
        hooks.append(router.register_forward_hook(_keep_routing(routing, layer)))
    try:
        with recording(model) as recorders:
            logits = model(idx)[0]  # (T, V)
    finally:
        for hook in hooks:
            hook.remove()
    attention = torch.stack([r.probs[0] for r in recorders])  # (L, H, T, T)
    lens = torch.stack([model.head(model.norm(x)) for x in outputs[1:]])  # (L, T, V)
    tokens = [decode([i]) if decode else str(i) for i in ids]
    return Trace(tokens, list(ids), attention.float().cpu(), logits.float().cpu(), lens.float().cpu(),
                 torch.stack(outputs).norm(dim=-1).float().cpu(), routing)


def _routers(model: Transformer) -> list[tuple[int, torch.nn.Module]]:
    return [(i, block.ffn.router) for i, block in enumerate(model.blocks) if hasattr(block.ffn, "router")]


def _keep_routing(routing: dict[int, dict[str, Tensor]], layer: int):
    def keep(module: torch.nn.Module, args: tuple, route: Any) -> None:
        routing[layer] = {"experts": route.experts.cpu(), "weights": route.weights.float().cpu()}

    return keep


# ---- per-head statistics ----------------------------------------------------------------------------


def head_statistics(attention: Tensor) -> dict[str, Tensor]:
    """(L, H) statistics of (L, H, T, T) probabilities: mean row entropy (nats), mean attention to the
    previous token and to the first token."""
    T = attention.size(-1)
    entropy = -(attention * attention.clamp_min(1e-12).log()).sum(-1).mean(-1)  # (L, H)
    previous = attention.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1) if T > 1 else torch.zeros(attention.shape[:2])
    first = attention[..., 1:, 0].mean(-1) if T > 1 else attention[..., 0]
    return {"entropy": entropy, "previous_token": previous, "first_token": first.reshape(attention.shape[:2])}


@torch.no_grad()
def induction_scores(model: Transformer, length: int = 32, seed: int = 0) -> Tensor:
    """(L, H) mean attention from each token of a repeated random sequence [r, r] to the token right
    after its previous occurrence: an induction head attends there (Olsson et al., 2022)."""
    length = max(2, min(length, model.cfg.max_seq_len // 2))
    generator = torch.Generator().manual_seed(seed)
    half = torch.randint(0, model.cfg.vocab_size, (length,), generator=generator).tolist()
    attention = trace(model, half + half).attention  # (L, H, 2n, 2n)
    queries = torch.arange(length, 2 * length)
    return attention[:, :, queries, queries - length + 1].mean(-1)


def top_predictions(logits: Tensor, ids: list[int], k: int = 5) -> dict[str, Tensor]:
    """Per position: the top-k next tokens and probabilities, the actual next token's probability
    and rank (-1 at the last position), and the entropy of the prediction."""
    probs = logits.float().softmax(-1)  # (T, V)
    top_p, top_i = probs.topk(min(k, probs.size(-1)), dim=-1)
    nxt = torch.tensor(ids[1:] + [0])
    actual_p = probs.gather(-1, nxt[:, None])[:, 0]
    rank = (probs > actual_p[:, None]).sum(-1)
    actual_p[-1], rank[-1] = float("nan"), -1
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    return {"top_ids": top_i, "top_probs": top_p, "next_prob": actual_p, "next_rank": rank, "entropy": entropy}


def logit_lens(lens: Tensor, logits: Tensor) -> dict[str, Tensor]:
    """Per layer and position: the lens' top-1 token and its probability for the final prediction."""
    final = logits.argmax(-1)  # (T,)
    probs = lens.softmax(-1)  # (L, T, V)
    return {"top_ids": probs.argmax(-1), "final_prob": probs.gather(-1, final.expand(lens.size(0), -1)[..., None])[..., 0]}


def finite(x: float) -> float | None:
    return None if math.isnan(x) else x

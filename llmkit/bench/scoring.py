"""Multiple choice by log-likelihood, each question's shared context run once.

A question's context is prefilled once into a KV cache (llmkit/generation: the same cached attention the
decoder uses); the cache's rows are then copied out to one per choice, and the choices' continuations run
over that prefix in batched forwards of rows of similar lengths. Several questions share each prefill
(contexts left-padded as the decoder does, longest first); continuations are right-padded (causal: padding
after a token never reaches it).
`per_choice_loglikelihoods` is the reference: one plain forward over context + continuation per choice,
truncated on the left to max_seq_len + 1 tokens as lm-eval does. Questions too long for the shared path
are scored that way; a continuation longer than max_seq_len itself (which lm-eval refuses) is scored by
its last max_seq_len tokens, so that a small model's in-training evaluation never stops the run.

Tokenization follows lm-eval's Hugging Face model (and llmkit's adapter): the continuation's tokens are
those of encode(context + continuation) after encode(context); trailing spaces of the context move to the
continuation; an empty context starts from the end-of-document token.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from llmkit.generation.decode import CachedDecoder, cached_attention, forward_cached, inference
from llmkit.model import Transformer
from llmkit.text.tokenizer import Tokenizer

Request = tuple[list[int], list[list[int]]]  # (context ids, continuation ids of each choice)


def empty_context(tokenizer: Tokenizer) -> list[int]:
    eos = tokenizer.eos_id
    return [eos] if eos is not None and eos >= 0 else tokenizer.encode("\n\n")


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return empty_context(tokenizer), tokenizer.encode(continuation)
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def encode_question(tokenizer: Tokenizer, context: str, continuations: list[str]) -> Request:
    """One context for every choice. encode_pair's context depends only on `context`, so it is shared."""
    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    for _, cont in pairs:
        if not cont:
            raise ValueError(f"a choice encodes to no tokens after context {context[-40:]!r}")
    return pairs[0][0], [cont for _, cont in pairs]


def _fits(request: Request, limit: int) -> bool:
    ctx, conts = request
    return len(ctx) + max(map(len, conts)) - 1 <= limit


@torch.no_grad()
def loglikelihoods(model: Transformer, requests: list[Request], batch_size: int = 16) -> list[list[float]]:
    """Sum of log p(continuation | context) of every choice of every question; shared-context path."""
    limit = model.cfg.max_seq_len
    if len({block.attention.window for block in model.blocks}) > 1:  # one KV cache cannot serve mixed windows
        return per_choice_loglikelihoods(model, requests, batch_size)
    out: list[list[float] | None] = [None] * len(requests)
    # longest contexts first, so that a batch's contexts are of similar lengths: little left padding
    shared = sorted((i for i, r in enumerate(requests) if _fits(r, limit)), key=lambda i: -len(requests[i][0]))
    for start in range(0, len(shared), batch_size):
        chunk = shared[start : start + batch_size]
        for i, lls in zip(chunk, _shared_batch(model, [requests[i] for i in chunk], batch_size), strict=True):
            out[i] = lls
    rest = [i for i, lls in enumerate(out) if lls is None]  # too long to share: together, one forward per choice
    for i, lls in zip(rest, per_choice_loglikelihoods(model, [requests[i] for i in rest], batch_size), strict=True):
        out[i] = lls
    model.pop_aux_losses()
    model.pop_metrics()
    return out  # type: ignore[return-value]


def _shared_batch(model: Transformer, requests: list[Request], group: int) -> list[list[float]]:
    decoder = CachedDecoder(model)
    with inference(model):
        first = F.log_softmax(decoder.prefill([ctx for ctx, _ in requests]).double(), dim=-1)  # (Q, V)
    owner = [q for q, (_, conts) in enumerate(requests) for _ in conts]  # question of each choice row
    conts = [c for _, cs in requests for c in cs]
    lls = [first[q, c[0]].item() for q, c in zip(owner, conts, strict=True)]
    # the tokens after each choice's first (which the prefill predicted), in groups of rows of similar
    # lengths, so that little of each group's forward is padding
    order = sorted((r for r in range(len(conts)) if len(conts[r]) > 1), key=lambda r: len(conts[r]))
    for start in range(0, len(order), group):
        rows = order[start : start + group]
        logits = _continue(model, decoder, [owner[r] for r in rows], [conts[r][:-1] for r in rows])  # (G, width, V)
        for g, r in enumerate(rows):  # row by row: float64 log-softmax of (len, V), not of (G, width, V)
            target = torch.tensor(conts[r][1:], device=logits.device)
            lp = F.log_softmax(logits[g, : len(target)].double(), dim=-1)
            lls[r] += lp.gather(-1, target[:, None]).sum().item()
    lls_iter = iter(lls)
    return [[next(lls_iter) for _ in cs] for _, cs in requests]


def _continue(model: Transformer, decoder: CachedDecoder, owner: list[int], inputs: list[list[int]]) -> Tensor:
    """One forward of every row's tokens over a copy of its question's prefilled cache; (G, width, V) logits
    of each next token. The copy holds the rows' own keys and values: the prefill's cache stays as it is."""
    prefill, device = decoder.cache, model.head.weight.device
    rows = torch.tensor(owner, device=device)
    questions = prefill.keys[0].size(0)
    cache = copy.copy(prefill)
    pos = prefill.pos if prefill.pos.dim() == 2 else prefill.pos.expand(questions, -1)  # (Q, columns)
    cache.pos = pos.index_select(0, rows)  # (G, columns)
    cache.keys = {layer: k.index_select(0, rows) for layer, k in prefill.keys.items()}  # (G, Hkv, S, D)
    cache.values = {layer: v.index_select(0, rows) for layer, v in prefill.values.items()}
    width = max(map(len, inputs))
    ids = torch.tensor([x + [0] * (width - len(x)) for x in inputs], device=device)  # (G, width), right-padded
    starts = decoder.next_pos.reshape(-1).expand(questions)  # (Q,): the first position after each context
    positions = starts.index_select(0, rows)[:, None] + torch.arange(width, device=device)  # (G, width)
    cache.begin(positions)
    return forward_cached(model, cached_attention(model, cache), ids, positions, last_only=False)  # (G, width, V)


@torch.no_grad()
def per_choice_loglikelihoods(model: Transformer, requests: list[Request], batch_size: int = 16) -> list[list[float]]:
    """The reference: one forward over context + continuation per choice (lm-eval's way)."""
    limit, device = model.cfg.max_seq_len, model.head.weight.device
    pairs = [(ctx, cont) for ctx, conts in requests for cont in conts]
    flat: list[float] = []
    with inference(model):
        for start in range(0, len(pairs), batch_size):
            rows = []
            for ctx, cont in pairs[start : start + batch_size]:
                cont = cont[-limit:]  # longer than the model's context (lm-eval refuses these): its last tokens
                full = (ctx + cont)[-(limit + 1):]
                rows.append((full[:-1], cont))
            width = max(len(inp) for inp, _ in rows)
            batch = torch.tensor([inp + [0] * (width - len(inp)) for inp, _ in rows], device=device)  # (B, width)
            logits = model(batch)  # (B, width, V)
            for r, (inp, cont) in enumerate(rows):
                lp = F.log_softmax(logits[r, len(inp) - len(cont) : len(inp)].double(), dim=-1)  # (len(cont), V)
                flat.append(lp.gather(-1, torch.tensor(cont, device=device)[:, None]).sum().item())
    model.pop_aux_losses()
    model.pop_metrics()
    it = iter(flat)
    return [[next(it) for _ in conts] for _, conts in requests]


def mc_record(lls: list[float], n_tokens: list[int], choices: list[str], continuations: list[str], gold: int) -> dict:
    """Per-question metrics: acc, acc_norm (per character of the choice, as lm-eval), acc_per_token,
    and bits per byte of the gold continuation."""
    def argmax(values: list[float]) -> int:
        return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first, as numpy's argmax

    return {
        "acc": float(argmax(lls) == gold),
        "acc_norm": float(argmax([ll / max(len(c), 1) for ll, c in zip(lls, choices, strict=True)]) == gold),
        "acc_per_token": float(argmax([ll / n for ll, n in zip(lls, n_tokens, strict=True)]) == gold),
        "bpb": -lls[gold] / (math.log(2) * max(len(continuations[gold].encode()), 1)),
    }

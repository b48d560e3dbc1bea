"""Choosing the next token (greedy, temperature, top-k, top-p), and the generation loop.

The loop owns each row's context. When a row's context would pass the model's max_seq_len, it
keeps the most recent half of that row and prefills again, so positions never run past what the
model was built for; both decoders see the same contexts, so they agree at every step.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

import torch
from torch import Tensor

from llmkit.generation.decode import CachedDecoder, Decoder, RecomputeDecoder
from llmkit.model import Transformer


def check_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 1 (0 or None: off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (None or 1: off), got {top_p}")


def keep_top_k(logits: Tensor, k: int) -> Tensor:
    """(B, V): -inf below each row's k-th largest logit (ties with it are kept)."""
    kth = torch.topk(logits, min(k, logits.size(-1))).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: Tensor, p: float) -> Tensor:
    """(B, V): -inf outside each row's nucleus, the most likely tokens whose probabilities first
    sum to at least p (the most likely token is always kept)."""
    ranked, order = logits.sort(dim=-1, descending=True)
    probs = ranked.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop = (mass_before >= p).scatter(-1, order, mass_before >= p)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Temperature, then top-k, then top-p (the order of Hugging Face's and llama.cpp's samplers)."""
    if temperature != 1:
        logits = logits / temperature
    if top_k:
        logits = keep_top_k(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = keep_top_p(logits, top_p)
    return logits


def next_tokens(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None, draws: Tensor | None = None,
) -> Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy: top_k and top_p then change nothing.
    draws: (B, 1) uniform numbers in [0, 1) to sample with, instead of drawing them from `generator`."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(process_logits(logits, temperature, top_k, top_p).float(), dim=-1)
    # inverse CDF: the first token whose cumulative probability exceeds a uniform draw (a token of
    # probability 0 adds nothing, so it is never drawn); torch.multinomial's CPU kernel takes ~8x as long
    # for a decoding batch, a tenth of each step of a small model
    cumulative = probs.cumsum(dim=-1)  # (B, V)
    if draws is None:
        draws = torch.rand(probs.size(0), 1, generator=generator, device=probs.device)
    draw = draws * cumulative[:, -1:]
    return torch.searchsorted(cumulative, draw, right=True).squeeze(-1).clamp(max=probs.size(-1) - 1)


def stream(
    model: Transformer, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int, *,
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, stop_ids: Collection[int] = (),
    generator: torch.Generator | None = None, cache: bool = True, decoder: Decoder | None = None,
) -> Iterator[list[int | None]]:
    """Yields, step by step, the next token of every row: None for a row that has stopped (a token
    of `stop_ids` ends a row and is not yielded). Ends after max_new_tokens steps or when every row
    has stopped. prompts: one list of ids per row, any lengths; cache=False recomputes every step.
    decoder: another engine behind the same prefill/step calls (llmkit/onnx.py's ONNX Runtime decoder);
    `model` then only needs its `cfg`."""
    check_options(temperature, top_k, top_p)
    limit = model.cfg.max_seq_len
    contexts = [[int(t) for t in p][-limit:] for p in (prompts.tolist() if isinstance(prompts, Tensor) else prompts)]
    if not contexts or not all(contexts):
        raise ValueError("every prompt needs at least one token (an empty text can start from the tokenizer's eos id)")
    if decoder is None:
        decoder = CachedDecoder(model) if cache else RecomputeDecoder(model)
    stop, done = set(stop_ids), [False] * len(contexts)
    tokens: list[int] = []
    for step in range(max_new_tokens):
        logits = decoder.prefill(contexts) if step == 0 else _advance(decoder, contexts, tokens, limit)
        tokens = next_tokens(logits, temperature, top_k, top_p, generator).tolist()
        done = [d or t in stop for d, t in zip(done, tokens, strict=True)]
        if all(done):
            return
        yield [None if d else t for d, t in zip(done, tokens, strict=True)]


def _advance(decoder: Decoder, contexts: list[list[int]], tokens: list[int], limit: int) -> Tensor:
    for context, token in zip(contexts, tokens, strict=True):
        context.append(token)
    if max(len(c) for c in contexts) <= limit:
        return decoder.step(tokens)
    keep = (limit + 1) // 2  # a full row keeps its last half, then every row is prefilled again
    contexts[:] = [c[-keep:] if len(c) > limit else c for c in contexts]
    return decoder.prefill(contexts)


def generate(
    model: Transformer, prompts: Sequence[Sequence[int]] | Tensor, max_new_tokens: int, **options: object
) -> list[list[int]]:
    """The new tokens of every row (up to, not including, its stop token); options as for `stream`."""
    rows: list[list[int]] = [[] for _ in range(len(prompts))]
    for step in stream(model, prompts, max_new_tokens, **options):
        for row, token in zip(rows, step, strict=True):
            if token is not None:
                row.append(token)
    return rows

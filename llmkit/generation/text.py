"""Streaming text: token ids to printable pieces as they arrive, and stop strings."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from llmkit.generation.sampling import stream
from llmkit.model import Transformer

if TYPE_CHECKING:
    from llmkit.text.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"  # what decoding gives for the first bytes of a character split over byte tokens


class IncrementalDetokenizer:
    """Text of the tokens pushed so far, piece by piece. Decodes only a short window of recent
    tokens (so the cost per token stays flat), and holds a piece back while it ends in a partial
    UTF-8 character (byte-fallback tokens), until the character is complete."""

    def __init__(self, tokenizer: Tokenizer, context: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context)  # the prompt: tokenizers may decode a piece differently at the start
        self.read = len(self.ids)  # ids[:read] have been returned as text
        self.prefix = max(0, self.read - 4)  # decoding starts here, a few tokens before `read`

    def push(self, token: int) -> str:
        self.ids.append(token)
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) <= len(done) or text.endswith(_INCOMPLETE):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(done) :]


class StopStrings:
    """Cuts streamed text at the first stop string, holding back any tail that could begin one, so
    that no part of a stop string is ever printed."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """The text that is safe to print now; sets `stopped` once a stop string has appeared."""
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending, self.stopped = "", True
            return text[: min(hits)]
        held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - held :]
        return text[: len(text) - held]

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def stream_text(
    model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, *, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, stop: Iterable[str] = (), stop_at_eos: bool = True,
    generator: torch.Generator | None = None, cache: bool = True,
) -> Iterator[str]:
    """The continuation of `prompt`, piece by piece as tokens are sampled. Stops at a stop string
    (which is not yielded), at the tokenizer's end-of-document token, or after max_new_tokens."""
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id or 0]
    stop_ids = [tokenizer.eos_id] if stop_at_eos and tokenizer.eos_id is not None else []
    pieces, stops = IncrementalDetokenizer(tokenizer, ids), StopStrings(stop)
    steps = stream(
        model, [ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids,
        generator=generator, cache=cache,
    )
    for (token,) in steps:
        text = stops.push(pieces.push(token))
        if text:
            yield text
        if stops.stopped:
            return
    tail = stops.push(pieces.flush())
    if not stops.stopped:
        tail += stops.flush()
    if tail:
        yield tail

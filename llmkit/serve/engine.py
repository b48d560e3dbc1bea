"""The serving engine: one thread that decodes every running request together, one token per step.

Between steps the scheduler admits waiting requests (up to `max_batch` rows): each is prefilled on
its own (one forward over its prompt, into a one-row KV cache) and samples its first token, then
joins the running batch (llmkit/serve/batch_cache.py). A step runs one token of every running row,
each at its own position, and samples each row with its own parameters and generator; a row that
meets its stop rule, its token budget, or a cancellation leaves the batch at once.

Callers submit from any thread (the HTTP server's event loop): `submit` returns a `Sequence` whose
`emit` callback receives an `Event` per step, called from the engine's thread. The queue of
waiting requests is bounded: `submit` raises QueueFull past `max_queue`.

Text comes out as it would from `llmkit generate`: the same incremental detokenizer and stop-string
rule (llmkit/generation/text.py), the same sampling (llmkit/generation/sampling.py).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmkit.generation import IncrementalDetokenizer, StopStrings, next_tokens
from llmkit.model import Transformer
from llmkit.onnx import OnnxModel
from llmkit.serve.metrics import Metrics
from llmkit.serve.runners import runner_for

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests are waiting than the server's max_queue."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings: cut the text, not returned
    stop_ids: list[int] = field(default_factory=list)  # end-of-document / end-of-turn tokens
    seed: int | None = None


@dataclass
class Event:
    """What one step gave a sequence: new text (possibly "" while a piece is held back), the token
    sampled (None for an error), and once finished, why ("stop" or "length"; "error" with a message)."""

    text: str
    token: int | None
    finish_reason: str | None = None
    error: str | None = None


_ids = itertools.count()


class Sequence:
    """One row: its prompt, sampling parameters and generator, detokenizer and stop rule."""

    def __init__(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None], tokenizer) -> None:
        self.id = next(_ids)
        self.prompt, self.params, self.emit = prompt, params, emit
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()  # from the OS's entropy, leaving torch's global generator alone
        else:
            self.generator.manual_seed(params.seed)
        self.pieces = IncrementalDetokenizer(tokenizer, prompt)
        self.stops = StopStrings(params.stop)
        self.generated = 0
        self.last_token = -1
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.last_emit = self.submitted

    def accept(self, token: int) -> Event:
        """Take a sampled token; the event to send, finished when a stop rule or the budget says so."""
        self.generated += 1
        self.last_token = token
        if token in self.params.stop_ids:
            return Event(self.stops.flush(), token, "stop")
        text = self.stops.push(self.pieces.push(token))
        if self.stops.stopped:
            return Event(text, token, "stop")
        if self.generated >= self.params.max_tokens:
            tail = self.stops.push(self.pieces.flush())
            return Event(text + tail + ("" if self.stops.stopped else self.stops.flush()), token, "length")
        return Event(text, token)


class Engine:
    """Owns the model: only its thread runs forwards. Start it once with `start()`. The model is llmkit's own
    or an ONNX export on ONNX Runtime (llmkit/onnx.py); its runner (runners.py) holds the batch's cache."""

    def __init__(
        self, model: Transformer | OnnxModel, tokenizer, *, max_batch: int = 16, max_queue: int = 256,
        metrics: Metrics | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or Metrics()
        self.runner = runner_for(model)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.peak_batch = 0  # the most rows one decode step has run (for tests and benchmarks)
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llmkit-engine", daemon=True)

    # ---- called from other threads --------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None]) -> Sequence:
        sequence = Sequence(prompt, params, emit, self.tokenizer)
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue}); retry later")
            self.waiting.append(sequence)
            self.metrics.waiting.set(len(self.waiting))
            self._wake.notify()
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        """The row leaves before the next step (or is never admitted)."""
        sequence.cancelled = True
        with self._wake:
            self._wake.notify()

    # ---- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not self.running:
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

    def step(self) -> None:
        """Admit what fits, then decode one token of every running row. The engine's thread calls
        this in a loop; tests call it directly to control when requests join."""
        with self._wake:
            admitted = self._take_waiting()
        for sequence in admitted:
            try:
                self._prefill(sequence)
            except Exception as err:  # this request fails alone
                log.exception("prefill failed")
                sequence.emit(Event("", None, "error", f"{type(err).__name__}: {err}"))
                self._finished(sequence, "error")
        try:
            self._leave([s for s in self.running if s.cancelled])
            if self.running:
                self._decode()
        except Exception as err:  # a failing forward ends its rows, never the server
            log.exception("decode step failed")
            self._leave(list(self.running), Event("", None, "error", f"{type(err).__name__}: {err}"))

    def _take_waiting(self) -> list[Sequence]:
        room = self.max_batch - len(self.running)
        admitted = []
        while self.waiting and len(admitted) < room:
            sequence = self.waiting.popleft()
            if sequence.cancelled:
                self._finished(sequence, "cancelled")
            else:
                admitted.append(sequence)
        self.metrics.waiting.set(len(self.waiting))
        return admitted

    def _prefill(self, sequence: Sequence) -> None:
        now = time.perf_counter()
        self.metrics.queue_time.observe(now - sequence.submitted)
        self.metrics.prompt_tokens.inc(len(sequence.prompt))
        logits, row = self.runner.prefill(sequence.prompt)  # (1, V), the row's own cache
        event = sequence.accept(self._sample([sequence], logits)[0])
        self.metrics.time_to_first_token.observe(time.perf_counter() - sequence.submitted)
        sequence.last_emit = time.perf_counter()
        self.metrics.generation_tokens.inc()
        sequence.emit(event)
        if event.finish_reason is None:
            self.runner.join(row)
            self.running.append(sequence)
        else:
            self._finished(sequence, event.finish_reason)
        self.metrics.running.set(len(self.running))

    def _decode(self) -> None:
        rows = self.running
        self.metrics.batch_size.set(len(rows))
        self.peak_batch = max(self.peak_batch, len(rows))
        positions = [len(s.prompt) + s.generated - 1 for s in rows]
        logits = self.runner.decode([s.last_token for s in rows], positions)  # (B, V)
        tokens = self._sample(rows, logits)
        now = time.perf_counter()
        done = []
        for sequence, token in zip(rows, tokens, strict=True):
            event = sequence.accept(token)
            self.metrics.inter_token_latency.observe(now - sequence.last_emit)
            sequence.last_emit = now
            sequence.emit(event)
            if event.finish_reason is not None:
                done.append((sequence, event.finish_reason))
        self.metrics.generation_tokens.inc(len(rows))
        if done:
            self._leave([s for s, _ in done], reasons=[r for _, r in done])

    def _sample(self, rows: list[Sequence], logits: Tensor) -> list[int]:
        """One token per row: greedy rows in one argmax, the others each with their own generator."""
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for i, sequence in enumerate(rows):
            p = sequence.params
            if p.temperature == 0:
                tokens.append(greedy[i])
            else:
                token = next_tokens(logits[i : i + 1].cpu(), p.temperature, p.top_k, p.top_p, sequence.generator)
                tokens.append(int(token))
        return tokens

    def _leave(self, sequences: list[Sequence], event: Event | None = None, reasons: list[str] | None = None) -> None:
        """Rows out of the batch: finished (their reasons), cancelled (no event), or failed (`event`)."""
        if not sequences:
            return
        gone = {id(s) for s in sequences}
        self.runner.drop([i for i, s in enumerate(self.running) if id(s) in gone])
        self.running = [s for s in self.running if id(s) not in gone]
        for i, sequence in enumerate(sequences):
            if event is not None:
                sequence.emit(event)
            reason = reasons[i] if reasons else (event.finish_reason if event else "cancelled")
            self._finished(sequence, reason)
        self.metrics.running.set(len(self.running))

    def _finished(self, sequence: Sequence, reason: str) -> None:
        self.metrics.e2e_latency.observe(time.perf_counter() - sequence.submitted)
        self.metrics.requests.labels(finish_reason=reason).inc()

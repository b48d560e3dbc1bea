"""The HTTP side of `llmkit serve`: FastAPI routes in OpenAI's shapes over one Engine.

    POST /v1/completions        text (or token-id) prompts, n choices each, streamed (SSE) or not
    POST /v1/chat/completions   messages rendered with the model's chat template (llmkit/text/chat.py)
    GET  /v1/models             the one model served
    GET  /health                503 while the model loads, 200 once the engine runs
    GET  /metrics               Prometheus text (llmkit/serve/metrics.py)

The model loads in a thread after the server starts listening, so /health answers at once. Each
request's rows are submitted to the engine, whose thread hands events back to the event loop
(call_soon_threadsafe into an asyncio queue). A client that disconnects cancels its rows: a stream
through the generator's `finally`, a plain request by polling `is_disconnected` while it waits.
Every client mistake is a 4xx in OpenAI's error body; nothing a client sends can stop the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from llmkit.serve import protocol as api
from llmkit.serve.engine import Engine, Event, QueueFull, SamplingParams
from llmkit.serve.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    model_name: str = "llmkit"
    checkpoint: str | None = None  # the path served: a client still sending it as `model` is told the name
    max_batch: int = 16
    max_queue: int = 256
    max_tokens_limit: int | None = None  # None: whatever fits the context


@dataclass
class Served:
    """What loading gives the server."""

    model: Any
    tokenizer: Any
    chat_template: str | None = None
    created: int = field(default_factory=api.now)


def load_served(ckpt: str, device: str, quantize: str | None = None, backend: str = "auto",
                chat_template: str | None = None) -> Served:
    """The checkpoint (or int8 directory, or ONNX export) with its tokenizer and chat template (an explicit one
    wins). backend=onnxruntime, or an ONNX export's directory under backend=auto, serves on ONNX Runtime."""
    from llmkit import onnx

    if backend == "onnxruntime" or (backend == "auto" and onnx.is_onnx_dir(ckpt)):
        exported = onnx.load_onnx(ckpt)
        model, tokenizer, recorded = exported, exported.tokenizer, exported.chat_template
    else:
        from llmkit.checkpoint import load_for_inference

        loaded = load_for_inference(ckpt, device, quantize, backend)
        model, tokenizer, recorded = loaded.model, loaded.tokenizer, loaded.checkpoint.get("chat_template")
    if tokenizer is None:
        raise ValueError(f"{ckpt} holds no tokenizer, so requests cannot be encoded")
    template = chat_template or recorded
    if template is not None:
        from llmkit.text.chat import check_template

        check_template(tokenizer, template)
    return Served(model, tokenizer, template)


def create_app(load: Callable[[], Served], settings: ServeSettings) -> FastAPI:
    state = ServerState(load, settings)
    app = FastAPI(title="llmkit serve", lifespan=state.lifespan)
    app.state.llmkit = state
    _errors(app)
    _routes(app, state)
    return app


class ServerState:
    def __init__(self, load: Callable[[], Served], settings: ServeSettings) -> None:
        self.load, self.settings = load, settings
        self.metrics = Metrics()
        self.served: Served | None = None
        self.engine: Engine | None = None
        self.load_error: str | None = None

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=self._load, name="llmkit-load", daemon=True).start()
        yield
        if self.engine is not None:
            self.engine.stop()

    def _load(self) -> None:
        try:
            served = self.load()
            engine = Engine(served.model, served.tokenizer, max_batch=self.settings.max_batch,
                            max_queue=self.settings.max_queue, metrics=self.metrics)
            engine.start()
            self.served, self.engine = served, engine
        except Exception as err:  # /health reports it; the process stays up for the operator to see why
            log.exception("loading the model failed")
            self.load_error = f"{type(err).__name__}: {err}"

    def ready(self) -> tuple[Engine, Served]:
        if self.engine is None or self.served is None:
            why = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise api.APIError(503, why, type="service_unavailable", code="model_not_ready")
        return self.engine, self.served

    def check_model(self, name: str) -> None:
        if name == self.settings.model_name:
            return
        served = self.settings.model_name
        if self.settings.checkpoint is not None and _same_path(name, self.settings.checkpoint):
            why = (f"The model is no longer addressed by its checkpoint path '{name}': this server names it '{served}'; "
                   f"send model='{served}' (GET /v1/models lists it; `llmkit serve model_name=...` sets it)")
        else:
            why = f"The model '{name}' does not exist; this server serves '{served}'"
        raise api.APIError(404, why, param="model", code="model_not_found")


def default_model_name(ckpt: str | Path) -> str:
    """What clients call the model when model_name is not set: the run's directory name for a run's checkpoint
    (`outputs/<run>/checkpoints/last.ckpt` -> `<run>`), else the file's stem or the directory's name. Never the
    path itself, which would tell every client where the weights live."""
    path = Path(ckpt).expanduser().resolve()
    if path.is_file() and path.parent.name == "checkpoints":
        return path.parent.parent.name
    return path.stem if path.is_file() else path.name


def _same_path(name: str, ckpt: str) -> bool:
    try:
        return Path(name).expanduser().resolve() == Path(ckpt).expanduser().resolve()
    except (OSError, ValueError):  # not a path at all (a name with odd characters)
        return False


def _errors(app: FastAPI) -> None:
    @app.exception_handler(api.APIError)
    async def api_error(request: Request, err: api.APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}"
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": ")
        return JSONResponse(api.APIError(400, message, param=where[0] if where else None).body(), status_code=400)

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception) -> JSONResponse:  # never a bare traceback to a client
        log.exception("unhandled error")
        body = api.APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(api.APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)


def _routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is None:
            body = {"status": "failed", "error": state.load_error} if state.load_error else {"status": "loading"}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        _, served = state.ready()
        card = {"id": state.settings.model_name, "object": "model", "created": served.created, "owned_by": "llmkit",
                "max_model_len": served.model.cfg.max_seq_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, request: Request) -> Response:
        engine, served = state.ready()
        state.check_model(body.model)
        body.refuse_unsupported()
        if body.echo or body.suffix:
            raise api.APIError(400, "echo and suffix are not supported by llmkit serve", param="echo" if body.echo else "suffix")
        prompts = [_prompt_ids(p, served) for p in body.prompts()]
        settings = state.settings
        rows = [(ids, _params(body, ids, body.max_tokens, served, settings, [], j)) for ids in prompts for j in range(body.n)]
        job = Job(engine, rows)
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.stream:
            return _sse(completion_stream(job, body, prompt_tokens, request))
        texts, reasons, tokens = await job.collect(request)
        choices = [api.completion_choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        return JSONResponse({"id": api.new_id("cmpl"), "object": "text_completion", "created": api.now(),
                             "model": body.model, "choices": choices, "usage": api.usage(prompt_tokens, tokens)})

    @app.post("/v1/chat/completions")
    async def chat(body: api.ChatRequest, request: Request) -> Response:
        engine, served = state.ready()
        state.check_model(body.model)
        body.refuse_unsupported()
        ids, stop_ids, stops = _chat_prompt(body, served)
        params = [_params(body, ids, body.budget(), served, state.settings, stop_ids, j, stops) for j in range(body.n)]
        job = Job(engine, [(ids, p) for p in params])
        if body.stream:
            return _sse(chat_stream(job, body, len(ids), request))
        texts, reasons, tokens = await job.collect(request)
        choices = [api.chat_choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        return JSONResponse({"id": api.new_id("chatcmpl"), "object": "chat.completion", "created": api.now(),
                             "model": body.model, "choices": choices, "usage": api.usage(len(ids), tokens)})


# ---- turning a request into engine rows --------------------------------------------------------------
def _prompt_ids(prompt: str | list[int], served: Served) -> list[int]:
    tokenizer, vocab = served.tokenizer, served.model.cfg.vocab_size
    if isinstance(prompt, str):
        return tokenizer.encode(prompt) or [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
    if not prompt or any(not 0 <= t < vocab for t in prompt):
        raise api.APIError(400, f"token-id prompts must be non-empty with ids in [0, {vocab})", param="prompt")
    return list(prompt)


def _chat_prompt(body: api.ChatRequest, served: Served) -> tuple[list[int], list[int], list[str]]:
    """The rendered conversation with an open assistant turn, the end-of-turn token, and its text."""
    template = served.chat_template
    if template is None:
        raise api.APIError(
            400, "this model has no chat template (it was not post-trained with one); use /v1/completions, or start "
            "the server with chat_template=chatml|alpaca|raw", param="messages", code="no_chat_template")
    from llmkit.text.chat import end_of_turn, end_of_turn_id, render_generation_prompt

    try:
        ids = render_generation_prompt(body.conversation(), served.tokenizer, template)
    except ValueError as err:
        raise api.APIError(400, str(err), param="messages") from err
    turn_end = end_of_turn_id(served.tokenizer, template)
    return ids, [] if turn_end is None else [turn_end], [s for s in [end_of_turn(template)] if s]


def _params(
    body: api.SamplingFields, ids: list[int], max_tokens: int | None, served: Served, settings: ServeSettings,
    stop_ids: list[int], index: int, stops: list[str] = (),
) -> SamplingParams:
    context = served.model.cfg.max_seq_len
    room = context - len(ids)
    param = "messages" if isinstance(body, api.ChatRequest) else "prompt"
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = len(ids) + (max_tokens or 1)
        raise api.APIError(
            400, f"This model's maximum context length is {context} tokens. However, you requested {asked} tokens "
            f"({len(ids)} in the prompt, {max_tokens or 1} for the completion). Please shorten the prompt or max_tokens.",
            param=param, code="context_length_exceeded")
    limit = settings.max_tokens_limit
    if max_tokens is not None and limit is not None and max_tokens > limit:
        raise api.APIError(400, f"max_tokens={max_tokens} is over this server's limit of {limit}", param="max_tokens")
    eos = served.tokenizer.eos_id
    return SamplingParams(
        max_tokens=min(max_tokens or room, limit or room), temperature=body.temperature,
        top_p=body.top_p if body.top_p < 1 else None, top_k=body.top_k or None, stop=list(body.stop) + list(stops),
        stop_ids=[] if body.ignore_eos else list(stop_ids) + ([] if eos is None else [eos]),
        seed=None if body.seed is None else body.seed + index,
    )


class Job:
    """The rows of one request, and the events the engine sends them, in the event loop's queue."""

    def __init__(self, engine: Engine, rows: list[tuple[list[int], SamplingParams]]) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.open = len(rows)
        self.sequences = []
        try:
            for index, (ids, params) in enumerate(rows):
                self.sequences.append(engine.submit(ids, params, self._emitter(index)))
        except QueueFull as err:
            self.cancel()
            raise api.APIError(429, str(err), type="rate_limit_error", code="queue_full") from err

    def _emitter(self, index: int) -> Callable[[Event], None]:
        def emit(event: Event) -> None:  # runs on the engine's thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
                pass

        return emit

    def cancel(self) -> None:
        for sequence in self.sequences:
            self.engine.cancel(sequence)

    async def events(self, request: Request) -> AsyncIterator[tuple[int, Event]]:
        """Events until every row has finished; cancels the rows if the client goes away."""
        while self.open:
            try:  # events already queued are taken without a timer (wait_for costs a task per call)
                index, event = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        self.cancel()
                        return
                    continue
            if event.finish_reason is not None:
                self.open -= 1
            yield index, event

    async def collect(self, request: Request) -> tuple[list[str], list[str], int]:
        """(text, finish reason) of every row and the number of tokens sampled, once all are done."""
        texts, reasons, tokens = [""] * len(self.sequences), [""] * len(self.sequences), 0
        try:
            async for index, event in self.events(request):
                if event.error:
                    raise api.APIError(500, f"generation failed: {event.error}", type="server_error")
                texts[index] += event.text
                tokens += event.token is not None
                reasons[index] = event.finish_reason or reasons[index]
        finally:
            self.cancel()  # no-op for finished rows; frees the rest if the client left or a row failed
        return texts, reasons, tokens


# ---- streaming ------------------------------------------------------------------------------------------
def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _streamed(job: Job, request: Request, include_usage: bool, chunk: Callable[..., dict[str, Any]],
                    piece: Callable[[int, str, str | None], dict[str, Any]], prompt_tokens: int) -> AsyncIterator[dict[str, Any]]:
    """Chunks of a streamed request: a chunk per piece of text and a final one per row; then usage."""
    tokens = 0
    try:
        async for index, event in job.events(request):
            if event.error:
                yield api.APIError(500, f"generation failed: {event.error}", type="server_error").body()
                return
            tokens += event.token is not None
            if event.text or event.finish_reason:
                yield chunk([piece(index, event.text, event.finish_reason)], None if include_usage else ...)
    finally:
        job.cancel()
    if include_usage:
        yield chunk([], api.usage(prompt_tokens, tokens))


def _chunker(kind: str, model: str, prefix: str) -> Callable[..., dict[str, Any]]:
    ident, created = api.new_id(prefix), api.now()

    def chunk(choices: list[dict[str, Any]], usage: Any = ...) -> dict[str, Any]:
        body = {"id": ident, "object": kind, "created": created, "model": model, "choices": choices}
        if usage is not ...:  # with include_usage every chunk carries "usage": null but the last
            body["usage"] = usage
        return body

    return chunk


def completion_stream(
    job: Job, body: api.CompletionRequest, prompt_tokens: int, request: Request
) -> AsyncIterator[dict[str, Any]]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk = _chunker("text_completion", body.model, "cmpl")
    return _streamed(job, request, include_usage, chunk, api.completion_choice, prompt_tokens)


async def chat_stream(job: Job, body: api.ChatRequest, prompt_tokens: int, request: Request) -> AsyncIterator[dict[str, Any]]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk = _chunker("chat.completion.chunk", body.model, "chatcmpl")
    usage = None if include_usage else ...
    for index in range(body.n):  # OpenAI opens each choice with the role
        yield chunk([api.chat_delta(index, {"role": "assistant", "content": ""}, None)], usage)

    def piece(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        return api.chat_delta(index, {"content": text} if text else {}, finish_reason)

    async for c in _streamed(job, request, include_usage, chunk, piece, prompt_tokens):
        yield c

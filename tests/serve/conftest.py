"""A real uvicorn server on 127.0.0.1 (a port the OS picks), in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from llmkit.serve.app import Served, ServerState, ServeSettings, create_app, load_served  # noqa: E402

CONTEXT = 256  # the served copy's max_seq_len: room for streams long enough to cancel mid-way


@dataclass
class LiveServer:
    url: str
    state: ServerState

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60)


def start_server(load: Callable[[], Served], settings: ServeSettings) -> tuple[LiveServer, Callable[[], None]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound before uvicorn starts: no race for the port
    app = create_app(load, settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

    return LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.llmkit), stop


def wait_ready(live: LiveServer) -> None:
    deadline = time.monotonic() + 60
    while live.state.engine is None:
        assert live.state.load_error is None, live.state.load_error
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.01)


@pytest.fixture(scope="session")
def serve_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny gqa_rope checkpoint with a longer context (RoPE has no table to resize)
    and the raw chat template, as post-training would record it."""
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    checkpoint["model_config"]["max_seq_len"] = CONTEXT
    checkpoint["chat_template"] = "raw"
    path = tmp_path_factory.mktemp("serve") / "served.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def live(serve_checkpoint: Path) -> Iterator[LiveServer]:
    settings = ServeSettings(model_name="tiny", max_batch=8, max_tokens_limit=200)
    server, stop = start_server(lambda: load_served(str(serve_checkpoint), "cpu"), settings)
    wait_ready(server)
    yield server
    stop()

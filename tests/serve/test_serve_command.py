"""`llmkit serve` as a user starts it: the console script, a port, /health, a completion, SIGTERM (extended)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import openai


@pytest.mark.extended
@pytest.mark.parametrize("quantize", ["null", "int8"])
def test_llmkit_serve_answers_the_openai_client_and_stops_on_sigterm(serve_checkpoint: Path, quantize: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    llmkit = Path(sys.executable).parent / "llmkit"
    server = subprocess.Popen([str(llmkit), "serve", f"ckpt={serve_checkpoint}", f"port={port}", "model_name=tiny",
                               f"quantize={quantize}", "log_level=warning"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "llmkit serve did not become healthy"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        reply = client.completions.create(model="tiny", prompt="import", max_tokens=8, temperature=0)
        assert reply.usage.completion_tokens >= 1
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert chat.choices[0].message.role == "assistant"
    finally:
        server.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells what stopped it
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)

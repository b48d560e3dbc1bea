"""`llmkit explore serve=true`: the page on a local port, with a prompt box that re-runs the forward."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from llmkit.explore.page import payload, render


def make_server(
    model: Any, tokenizer: Any, prompt: str, host: str = "127.0.0.1", port: int = 0, **options: Any
) -> ThreadingHTTPServer:
    """A server (not yet serving) for `/` (the page for `prompt`) and `/trace?prompt=...` (its data as JSON)."""
    first = render(payload(model, tokenizer, prompt, **options), serve=True).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urlparse(self.path)
            if url.path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", first)
            elif url.path == "/trace":
                text = parse_qs(url.query).get("prompt", [""])[0]
                try:
                    self._send(200, "application/json", json.dumps(payload(model, tokenizer, text, **options)).encode())
                except ValueError as err:  # an empty prompt: the page shows the message
                    self._send(400, "application/json", json.dumps({"error": str(err)}).encode())
            else:
                self._send(404, "application/json", json.dumps({"error": f"no page at {url.path}"}).encode())

        def _send(self, status: int, kind: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per request is noise here
            pass

    return ThreadingHTTPServer((host, port), Handler)

"""Benchmark: `llmkit serve` under load on loopback, at several concurrencies, fp32 and int8, in one run.

  python scripts/bench_serve.py [--requests 64] [--concurrency 1 4 16] [--max-tokens 32] [--models tiny 25m]
                                [--int8] [--device cpu]

For each model it writes a randomly initialised checkpoint (speed does not depend on the weights),
starts the real `llmkit serve` on 127.0.0.1 in a subprocess, and sends `--requests` streamed
completions (random 16-64-token prompts, `max_tokens` tokens each, ignore_eos so every request
generates exactly that many) from an asyncio client with at most C in flight. It prints, per
model and concurrency: generated tokens/s, time to first token and inter-token latency p50/p99 as
the client saw them, and errors (any is a failure). Then the ratios: tokens/s at the highest
concurrency over concurrency 1, and int8 over fp32 (with --int8: the same model served with
quantize=int8). Everything is bounded: a request that takes over a minute counts as an error.

Models: tiny = the default preset's sizes (d_model 128, 4 layers, vocab 2k); 25m = d_model 512,
8 layers, 8 heads, vocab 8k (25M parameters in the blocks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from llmkit.model import ModelConfig, Transformer
from llmkit.text.tokenizer import CharTokenizer

MODELS = {
    "tiny": dict(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, max_seq_len=256),
    "25m": dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, max_seq_len=256),
}


def write_checkpoint(name: str, directory: Path) -> Path:
    """A checkpoint as training writes it (model config, weights, tokenizer) with random weights."""
    cfg = ModelConfig(**MODELS[name])
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokenizer = CharTokenizer("".join(chr(0x4E00 + i) for i in range(cfg.vocab_size - 1)))  # one char per id
    path = directory / f"{name}.ckpt"
    torch.save({"model_config": cfg.to_dict(), "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "LMDataModule": {"tokenizer": tokenizer.to_state()}}, path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(ckpt: Path, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llmkit", "serve", f"ckpt={ckpt}", f"port={port}", "model_name=bench",
           "log_level=warning", "max_batch=64", *extra]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"llmkit serve exited: {server.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("llmkit serve did not become healthy within 120 s")


async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"{response.status_code} {await response.aread()}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens != max_tokens or not arrivals:
        return {"error": f"got {tokens} tokens, expected {max_tokens}"}
    return {"ttft": arrivals[0] - start, "itl": [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)], "tokens": tokens}


async def load(port: int, requests: int, concurrency: int, max_tokens: int, vocab: int) -> dict:
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(16, 64))] for _ in range(requests)]
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits) as client:

        async def bounded(prompt: list[int]) -> dict:
            async with gate:
                try:
                    return await one_request(client, prompt, max_tokens)
                except (httpx.HTTPError, asyncio.TimeoutError) as err:
                    return {"error": repr(err)}

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft"] for r in ok)
    itl = sorted(x for r in ok for x in r["itl"])
    return {"tok_s": sum(r["tokens"] for r in ok) / wall, "ttft": ttft, "itl": itl,
            "errors": [r["error"] for r in results if "error" in r]}


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p * len(values)))] * 1000 if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=["tiny", "25m"], choices=list(MODELS))
    parser.add_argument("--int8", action="store_true", help="also serve each model with quantize=int8")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.requests} requests x {args.max_tokens} tokens")
    header = f"{'model':<10}{'weights':<8}{'conc':>5}{'tok/s':>9}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>9}{'p99':>8}{'errors':>8}"
    print(header + "   (latencies in ms)")
    rates: dict[tuple[str, str, int], float] = {}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ckpt = write_checkpoint(name, Path(tmp))
            for weights in ["fp32", "int8"] if args.int8 else ["fp32"]:
                port = free_port()
                extra = [f"device={args.device}"] + (["quantize=int8"] if weights == "int8" else [])
                server = start_server(ckpt, port, extra)
                try:
                    asyncio.run(load(port, 2, 1, 4, MODELS[name]["vocab_size"]))  # warm-up
                    for c in args.concurrency:
                        r = asyncio.run(load(port, args.requests, c, args.max_tokens, MODELS[name]["vocab_size"]))
                        rates[name, weights, c] = r["tok_s"]
                        failed |= bool(r["errors"])
                        print(f"{name:<10}{weights:<8}{c:>5}{r['tok_s']:>9.1f}{pct(r['ttft'], .5):>10.1f}"
                              f"{pct(r['ttft'], .99):>8.1f}{pct(r['itl'], .5):>9.2f}{pct(r['itl'], .99):>8.2f}"
                              f"{len(r['errors']):>8}", flush=True)
                        for error in r["errors"][:3]:
                            print(f"    error: {error}")
                finally:
                    server.terminate()
                    server.wait(timeout=30)
    low, high = min(args.concurrency), max(args.concurrency)
    for name in args.models:
        for weights in ["fp32", "int8"] if args.int8 else ["fp32"]:
            ratio = rates[name, weights, high] / rates[name, weights, low]
            print(f"{name} {weights}: tokens/s at concurrency {high} / concurrency {low} = {ratio:.2f}x (goal >= 4x)")
        if args.int8:
            for c in args.concurrency:
                ratio = rates[name, "int8", c] / rates[name, "fp32", c]
                print(f"{name}: int8 / fp32 tokens/s at concurrency {c} = {ratio:.2f}x (goal >= 1.5x for 25m)")
    if failed:
        raise SystemExit("some requests failed")


if __name__ == "__main__":
    main()

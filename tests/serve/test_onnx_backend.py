"""`llmkit export format=onnx` of the served checkpoint, then the same checks on ONNX Runtime: logits equal
llmkit's (with and without the KV cache, rows of different lengths), greedy continuations identical, and
`llmkit serve` on the export answering the official openai client (streamed == plain, concurrent == alone)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from llmkit.checkpoint import load_checkpoint  # noqa: E402
from llmkit.cli import main as llmkit  # noqa: E402
from llmkit.generation import generate  # noqa: E402
from llmkit.generation.decode import CachedDecoder  # noqa: E402
from llmkit.onnx import OnnxDecoder, load_onnx  # noqa: E402
from llmkit.serve.app import ServeSettings, load_served  # noqa: E402
from tests.serve.conftest import LiveServer, start_server, wait_ready  # noqa: E402

# fp32 throughout, but onnxruntime fuses and orders the matmul sums differently from torch's kernels: at
# these widths (d_model 64) the logits' rounding differences measured ~1e-6; 1e-4 leaves room for the
# other machine kind's kernels and still catches any wrong mask, position or cache column (errors of O(0.1))
TOLERANCE = 1e-4
ROWS = [[5, 9, 2, 7, 3, 11, 4], [8, 6, 12]]  # two rows of different lengths: left padding is exercised


@pytest.fixture(scope="module")
def onnx_dir(serve_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model"
    llmkit(["export", f"ckpt={serve_checkpoint}", f"out={out}", "format=onnx"])
    return out


@pytest.fixture(scope="module")
def model(serve_checkpoint: Path) -> torch.nn.Module:
    return load_checkpoint(serve_checkpoint).model


def test_logits_equal_llmkit_without_and_with_the_cache(onnx_dir: Path, model) -> None:
    onnx = OnnxDecoder(load_onnx(onnx_dir))
    first = onnx.prefill(ROWS)  # no past: the whole prompts, left-padded
    for row, ids in enumerate(ROWS):  # against the plain training forward of each row alone
        with torch.no_grad():
            reference = model(torch.tensor([ids]))[0, -1]
        torch.testing.assert_close(first[row], reference, atol=TOLERANCE, rtol=0)
    cached = CachedDecoder(model)
    torch.testing.assert_close(first, cached.prefill(ROWS), atol=TOLERANCE, rtol=0)
    for tokens in ([1, 2], [3, 4], [13, 14]):  # with the past: one new token per row
        torch.testing.assert_close(onnx.step(tokens), cached.step(tokens), atol=TOLERANCE, rtol=0)


def test_greedy_continuations_are_identical(onnx_dir: Path, model) -> None:
    exported = load_onnx(onnx_dir)
    ours = generate(model, ROWS, 24, temperature=0)
    theirs = generate(exported, ROWS, 24, temperature=0, decoder=OnnxDecoder(exported))
    assert theirs == ours and all(len(r) == 24 for r in ours)


@pytest.fixture(scope="module")
def onnx_live(onnx_dir: Path) -> Iterator[LiveServer]:
    server, stop = start_server(lambda: load_served(str(onnx_dir), "cpu"), ServeSettings(model_name="tiny", max_batch=8))
    wait_ready(server)
    yield server
    stop()


def test_served_on_onnxruntime_streamed_equals_plain_equals_llmkit(onnx_live: LiveServer, model) -> None:
    assert type(onnx_live.state.engine.runner).__name__ == "OnnxRunner"
    client = onnx_live.client()
    plain = client.completions.create(model="tiny", prompt="import", max_tokens=20, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = client.completions.create(model="tiny", prompt="import", max_tokens=20, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    tokenizer = onnx_live.state.served.tokenizer
    expected = generate(model, [tokenizer.encode("import")], 20, temperature=0)[0]
    assert plain.choices[0].text == tokenizer.decode(expected) and plain.usage.completion_tokens == 20


def test_concurrent_requests_on_onnxruntime_get_what_they_get_alone(onnx_live: LiveServer) -> None:
    prompts, budgets = ["import", "def f(x):", "class A", "#", "x = 1"], [30, 12, 25, 18, 7]
    client = onnx_live.client()

    def complete(i: int) -> str:
        reply = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=budgets[i], temperature=0,
                                          extra_body={"ignore_eos": True})
        return reply.choices[0].text

    alone = [complete(i) for i in range(len(prompts))]
    onnx_live.state.engine.peak_batch = 0
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(complete, range(len(prompts))))
    assert together == alone
    assert onnx_live.state.engine.peak_batch >= 3  # rows joined and left a running batch

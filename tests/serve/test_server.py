"""`llmkit serve` through the official `openai` client against a real uvicorn server on loopback."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmkit.cli import main as llmkit
from llmkit.generation import IncrementalDetokenizer, generate
from llmkit.serve.app import ServeSettings, load_served
from tests.serve.conftest import CONTEXT, LiveServer, openai, start_server, wait_ready

PROMPT = "import"  # no spaces: it goes through a Hydra override unquoted in the `llmkit generate` comparison


def metrics(live: LiveServer) -> dict[str, float]:
    text = httpx.get(f"{live.url}/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


def test_completion_streamed_equals_plain_equals_llmkit_generate(live: LiveServer, serve_checkpoint, capsys) -> None:
    client = live.client()
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks)
    llmkit(["generate", f"ckpt={serve_checkpoint}", f"prompt={PROMPT}", "max_new_tokens=24", "temperature=0"])
    printed = capsys.readouterr().out
    assert printed.startswith(PROMPT) and printed.endswith("\n")
    assert plain.choices[0].text == streamed == printed[len(PROMPT) : -1]
    assert plain.choices[0].text  # the comparison is not between empty strings
    reason = plain.choices[0].finish_reason
    assert chunks[-1].choices[0].finish_reason == reason in ("stop", "length")
    tokenizer = live.state.served.tokenizer
    assert plain.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    if reason == "length":
        assert plain.usage.completion_tokens == 24
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens


def test_chat_uses_the_checkpoint_template_streamed_equals_plain_equals_generate(live: LiveServer) -> None:
    from llmkit.text.chat import render_generation_prompt

    client = live.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "import os"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    served = live.state.served
    ids = render_generation_prompt(messages, served.tokenizer, "raw")  # the checkpoint's template
    eos = served.tokenizer.eos_id
    tokens = generate(served.model, [ids], 16, temperature=0.0, stop_ids=[eos])[0]
    pieces = IncrementalDetokenizer(served.tokenizer, ids)
    expected = "".join(pieces.push(t) for t in tokens) + pieces.flush()
    assert plain.choices[0].message.content == streamed == expected
    assert plain.usage.prompt_tokens == len(ids)
    assert plain.usage.completion_tokens == len(tokens) + (plain.choices[0].finish_reason == "stop")


def test_stop_strings_cut_the_text_and_finish_with_stop(live: LiveServer) -> None:
    client = live.client()
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    assert len(full) >= 8, full
    stop = full[5:8]
    cut = full[: full.find(stop)]
    for stream in (False, True):
        response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop],
                                             stream=stream)
        chunks = list(response) if stream else [response]
        assert "".join(c.choices[0].text for c in chunks) == cut
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_are_seeded_and_indexed(live: LiveServer) -> None:
    client = live.client()
    greedy = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].text == greedy.choices[1].text
    sampled = [client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, n=2, seed=7)
               for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # the seed reproduces
    assert greedy.usage.completion_tokens == 16 or greedy.choices[0].finish_reason == "stop"


def test_include_usage_sends_a_last_chunk_with_usage_only(live: LiveServer) -> None:
    client = live.client()
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])
    chat = list(live.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens >= 1


def test_metrics_count_what_the_clients_saw(live: LiveServer) -> None:
    client = live.client()
    before = metrics(live)
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=9, temperature=0)
    streamed = list(client.completions.create(model="tiny", prompt="class", max_tokens=7, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))[-1]
    after = metrics(live)
    generated = plain.usage.completion_tokens + streamed.usage.completion_tokens
    prompts = plain.usage.prompt_tokens + streamed.usage.prompt_tokens
    assert after["llmkit_generation_tokens_total"] - before["llmkit_generation_tokens_total"] == generated
    assert after["llmkit_prompt_tokens_total"] - before["llmkit_prompt_tokens_total"] == prompts
    assert after["llmkit_time_to_first_token_seconds_count"] - before["llmkit_time_to_first_token_seconds_count"] == 2
    assert after["llmkit_e2e_request_latency_seconds_count"] - before["llmkit_e2e_request_latency_seconds_count"] == 2
    assert after["llmkit_requests_running"] == 0 and after["llmkit_requests_waiting"] == 0
    assert after["llmkit_inter_token_latency_seconds_count"] - before["llmkit_inter_token_latency_seconds_count"] == generated - 2


def test_concurrent_greedy_requests_get_exactly_their_tokens_alone(live: LiveServer) -> None:
    prompts = ["import", "def f(x):", "class A", "#", "from os import path", "x = 1", "while True:", "print("]
    budgets = [40, 25, 60, 33, 47, 20, 55, 38]
    client = live.client()

    def complete(i: int) -> tuple[str, int]:
        r = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=budgets[i], temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text, r.usage.completion_tokens

    alone = [complete(i) for i in range(8)]
    live.state.engine.peak_batch = 0
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(complete, range(8)))
    assert together == alone
    assert [n for _, n in alone] == budgets
    assert live.state.engine.peak_batch >= 4  # they really were decoded together


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 201}, "max_tokens"),  # over the server's max_tokens_limit
    ({"temperature": "hot"}, "temperature"),
    ({"prompt": list(range(CONTEXT + 5))}, "prompt"),  # longer than the context
    ({"max_token": 5}, "max_token"),  # a typo is named, not ignored
    ({"top_p": 0}, "top_p"),
    ({"logprobs": 3}, "logprobs"),
])
def test_bad_parameters_are_400_naming_the_parameter(live: LiveServer, body: dict, param: str) -> None:
    request = {"model": "tiny", "prompt": PROMPT, **body}
    response = httpx.post(f"{live.url}/v1/completions", json=request)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_client_errors_raise_the_clients_own_classes_and_the_server_keeps_serving(live: LiveServer) -> None:
    client = live.client()
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=3)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=CONTEXT)
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=3)
    malformed = httpx.post(f"{live.url}/v1/completions", content=b'{"model": "tiny", "prompt": ',
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]["message"]
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0).choices[0].text
    assert httpx.get(f"{live.url}/health").status_code == 200
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_health_is_503_while_loading_then_200_and_a_full_queue_is_429(serve_checkpoint, tiny_checkpoint) -> None:
    gate = threading.Event()

    def slow_load():
        gate.wait(timeout=60)
        return load_served(str(tiny_checkpoint), "cpu")  # no chat template in this one

    server, stop = start_server(slow_load, ServeSettings(model_name="tiny", max_queue=0))
    try:
        loading = httpx.get(f"{server.url}/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        with pytest.raises(openai.APIStatusError) as unavailable:
            server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert unavailable.value.status_code == 503
        gate.set()
        wait_ready(server)
        assert httpx.get(f"{server.url}/health").status_code == 200
        with pytest.raises(openai.RateLimitError):  # max_queue=0: nothing may wait
            server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        with pytest.raises(openai.BadRequestError) as no_template:
            server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert no_template.value.code == "no_chat_template"
    finally:
        gate.set()
        stop()


def test_a_cancelled_stream_frees_its_row(serve_checkpoint) -> None:
    def slowed():  # 5 ms per forward: a 250-token stream lasts over a second, so it is cancelled mid-way
        served = load_served(str(serve_checkpoint), "cpu")
        served.model.register_forward_hook(lambda *_: time.sleep(0.005))
        return served

    server, stop = start_server(slowed, ServeSettings(model_name="tiny"))
    try:
        wait_ready(server)
        stream = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=CONTEXT - 10,
                                                    temperature=0, stream=True, extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        deadline = time.monotonic() + 10
        while metrics(server).get('llmkit_requests_total{finish_reason=cancelled}', 0) < 1:
            assert time.monotonic() < deadline, "the row was not cancelled"
            time.sleep(0.02)
        after = metrics(server)
        assert after["llmkit_requests_running"] == 0 and not server.state.engine.running
        assert after["llmkit_generation_tokens_total"] < CONTEXT - 10
    finally:
        stop()


def test_llmkit_serve_refuses_a_missing_checkpoint_before_listening(tmp_path) -> None:
    with pytest.raises(SystemExit, match="no such checkpoint file or int8 directory"):
        llmkit(["serve", f"ckpt={tmp_path / 'nope.ckpt'}"])

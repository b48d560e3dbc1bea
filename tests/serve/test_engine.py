"""The engine's batch: rows that join and leave mid-decode get exactly the tokens they get alone."""

from __future__ import annotations

import pytest
import torch

from llmkit.generation import generate
from llmkit.serve.engine import Engine, Event, SamplingParams
from tests.model.helpers import VOCAB, tiny_model


class Letters:
    """A tokenizer whose token i is one letter: enough for the engine's detokenizer."""

    eos_id = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 48 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(48 + i) for i in ids)


VARIANTS = {
    "learned": {},
    "rope_gqa": dict(position={"name": "rope"}, attention={"name": "causal", "n_kv_heads": 2}),
    "alibi_window": dict(position={"name": "alibi"}, attention={"name": "causal", "window": 5}),
    "t5_post_ln": dict(position={"name": "t5", "num_buckets": 8, "max_distance": 16}, block={"name": "post_ln"}),
}


def _collect(engine: Engine, prompt: list[int], max_tokens: int, out: dict, key: int) -> None:
    out[key] = []

    def emit(event: Event) -> None:
        if event.token is not None:
            out[key].append(event.token)

    engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), emit)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rows_joining_and_leaving_mid_decode_match_each_prompt_alone(variant: str) -> None:
    model = tiny_model(**VARIANTS[variant])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 1, 6, 12, 4)]
    budgets = [8, 3, 10, 5, 7, 9]
    engine = Engine(model, Letters(), max_batch=4)
    out: dict[int, list[int]] = {}
    for i in range(3):  # three rows start together
        _collect(engine, prompts[i], budgets[i], out, i)
    engine.step()
    engine.step()
    for i in range(3, 6):  # then longer and shorter prompts join a running batch (one waits for room)
        _collect(engine, prompts[i], budgets[i], out, i)
    for _ in range(40):
        engine.step()
    assert not engine.running and not engine.waiting
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], budgets[i], temperature=0.0)[0]
        assert out[i] == alone, f"prompt {i}"

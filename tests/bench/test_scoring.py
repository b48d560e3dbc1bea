"""Shared-context scoring equals one forward per choice; the per-question metrics are lm-eval's."""

from __future__ import annotations

import math
import random

import pytest
import torch

from llmkit.bench.scoring import encode_pair, encode_question, loglikelihoods, mc_record, per_choice_loglikelihoods
from tests.bench.conftest import char_model, char_tokenizer


def random_requests(seed: int, vocab: int, n: int = 9) -> list[tuple[list[int], list[list[int]]]]:
    rng = random.Random(seed)
    return [([rng.randrange(1, vocab) for _ in range(rng.randint(1, 30))],
             [[rng.randrange(1, vocab) for _ in range(rng.randint(1, 7))] for _ in range(rng.randint(2, 5))])
            for _ in range(n)]


@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
def test_shared_context_equals_one_forward_per_choice(position: str) -> None:
    model = char_model(position=position, max_seq_len=48)
    requests = random_requests(0, model.cfg.vocab_size)
    requests.append(([5] * 45, [[6] * 5, [7]]))  # too long to share: scored per choice, truncated as lm-eval
    embedded = []
    hook = model.tok_emb.register_forward_hook(lambda m, args, out: embedded.append(args[0].numel()))
    shared = loglikelihoods(model, requests, batch_size=4)
    shared_tokens, embedded[:] = sum(embedded), []
    reference = per_choice_loglikelihoods(model, requests, batch_size=1)
    hook.remove()
    # fp32 logits, float64 log-softmax: the sums of <= 7 log-probs (each |.| < 10) differ by ~1e-6 at most
    # between the cached and the plain forward (other summation order); 1e-5 leaves room for AVX-512 kernels
    for got, want in zip(shared, reference, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    # each context ran once, not once per choice: fewer tokens embedded even with the padding of batching
    assert shared_tokens < sum(embedded)


def test_sliding_window_model_shares_context_too() -> None:
    torch.manual_seed(0)
    model = char_model(max_seq_len=64)
    for block in model.blocks:
        block.attention.window = 8  # shorter than the contexts: the cache keeps the last 8 columns
    requests = random_requests(1, model.cfg.vocab_size)
    for got, want in zip(loglikelihoods(model, requests, 3), per_choice_loglikelihoods(model, requests, 1), strict=True):
        assert got == pytest.approx(want, abs=1e-5)


def test_tokenization_is_lm_evals() -> None:
    tok = char_tokenizer()
    assert encode_pair(tok, "Answer: ", "B") == (tok.encode("Answer:"), tok.encode(" B"))  # trailing space moves
    assert encode_pair(tok, "", "B") == (tok.encode("\n\n"), tok.encode("B"))  # no eos: the document separator
    ctx, conts = encode_question(tok, "Q:", [" yes", " no"])
    assert ctx == tok.encode("Q:") and conts == [tok.encode(" yes"), tok.encode(" no")]


def test_mc_record_metrics() -> None:
    # choice 0 has the best total, choice 1 the best per character, choice 2 the best per token
    lls, n_tokens, choices = [-3.0, -4.0, -5.0], [1, 4, 10], ["a", "bbbbbbbbbb", "cc"]
    conts = [" " + c for c in choices]
    r = mc_record(lls, n_tokens, choices, conts, gold=1)
    assert (r["acc"], r["acc_norm"], r["acc_per_token"]) == (0.0, 1.0, 0.0)
    assert mc_record(lls, n_tokens, choices, conts, gold=2)["acc_per_token"] == 1.0
    assert r["bpb"] == pytest.approx(4.0 / (math.log(2) * 11))  # -ll / (ln 2 * bytes of " bbbbbbbbbb")
    assert mc_record([-1.0, -1.0], [1, 1], ["x", "y"], [" x", " y"], gold=0)["acc"] == 1.0  # ties: the first, as argmax

"""Paired tests: McNemar and the bootstrap against scipy; a model against itself is within noise, a model
trained on a task against an untrained one is beyond noise."""

from __future__ import annotations

import random
import string

import pytest
import torch

from llmkit.bench.paired import BEYOND, WITHIN, compare, mcnemar, paired_bootstrap
from llmkit.bench.runner import evaluate
from llmkit.bench.tasks import MCDoc, Task
from tests.bench.conftest import char_model, char_tokenizer

LETTERS = string.ascii_lowercase


def successor_task(n: int = 60, seed: int = 0) -> Task:
    """Which letter comes next after a run of consecutive letters ("cdefg" -> "h")? Four choices."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        start = rng.randrange(26)
        run = "".join(LETTERS[(start + j) % 26] for j in range(5))
        answer = LETTERS[(start + 5) % 26]
        choices = [answer, *rng.sample([c for c in LETTERS if c != answer], 3)]
        rng.shuffle(choices)
        docs.append(MCDoc(i, run, choices, choices.index(answer), delimiter=""))
    return Task("successor", "multiple_choice", docs)


def trained_on_successor(steps: int = 30) -> torch.nn.Module:
    tok, model = char_tokenizer(), char_model(seed=1, max_seq_len=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # a bigram rule: learned (acc 1.0) in ~30 steps
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, 26, (16,), generator=g).tolist()
        texts = ["".join(LETTERS[(s + j) % 26] for j in range(33)) for s in starts]
        ids = torch.tensor([tok.encode(t) for t in texts])  # (16, 33)
        loss = model.loss(ids[:, :-1], ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_mcnemar_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    a = [1] * 10 + [0] * 3 + [1] * 20 + [0] * 7
    b = [0] * 10 + [1] * 3 + [1] * 20 + [0] * 7
    r = mcnemar(a, b)  # 13 discordant pairs: exact
    assert (r["only_a"], r["only_b"], r["test"]) == (10, 3, "mcnemar_exact")
    assert r["p"] == pytest.approx(stats.binomtest(3, 13, 0.5).pvalue, rel=1e-12)
    big = mcnemar([1] * 40 + [0] * 20, [0] * 40 + [1] * 20)  # 60 discordant pairs: chi-squared, continuity-corrected
    assert big["p"] == pytest.approx(stats.chi2.sf((40 - 20 - 1) ** 2 / 60, 1), rel=1e-9)
    assert mcnemar([1, 0], [1, 0])["p"] == 1.0


def test_bootstrap_sees_a_shift_and_not_noise() -> None:
    rng = random.Random(0)
    a = [rng.gauss(0, 1) for _ in range(200)]
    assert paired_bootstrap(a, [x - 0.5 for x in a])["p"] < 0.01  # every question 0.5 better
    b = [x + rng.gauss(0, 0.01) for x in a]
    assert paired_bootstrap(a, b)["p"] > 0.05


def test_model_against_itself_is_within_noise_and_trained_beyond() -> None:
    tok, task = char_tokenizer(), successor_task()
    untrained = evaluate(char_model(seed=1, max_seq_len=64), tok, [task])
    again = evaluate(char_model(seed=1, max_seq_len=64), tok, [task])
    same = compare(untrained, again)["successor"]
    assert {m["verdict"] for m in same.values()} == {WITHIN}
    trained = evaluate(trained_on_successor(), tok, [task])
    assert trained["tasks"]["successor"]["metrics"]["acc"]["value"] > 0.9  # it learned the task
    diff = compare(trained, untrained)["successor"]
    assert diff["acc"]["verdict"] == BEYOND and diff["acc"]["diff"] > 0.5
    assert diff["bpb"]["verdict"] == BEYOND and diff["bpb"]["test"] == "paired_bootstrap"

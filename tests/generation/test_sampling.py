"""Logits processors: temperature, top-k, top-p, greedy; and their argument checks."""

import math

import pytest
import torch

from llmkit.generation import next_tokens, process_logits
from llmkit.generation.sampling import keep_top_k, keep_top_p

INF = float("inf")


def _logits(*probs: float) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])


def test_top_k_keeps_the_k_largest_and_their_ties() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 3.0], [5.0, 1.0, 2.0, 3.0, 4.0]])
    kept = keep_top_k(logits, 2)
    assert kept[0].tolist() == [-INF, 4.0, 3.0, -INF, 3.0]  # 3.0 ties for second place: both stay
    assert kept[1].tolist() == [5.0, -INF, -INF, -INF, 4.0]
    assert torch.equal(keep_top_k(logits, 10), logits)  # k beyond the vocabulary keeps everything


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = _logits(0.1, 0.5, 0.15, 0.25)  # ranked: 0.5, 0.25, 0.15, 0.1
    assert torch.isfinite(keep_top_p(logits, 0.5)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(keep_top_p(logits, 0.6)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(keep_top_p(logits, 0.74)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(keep_top_p(logits, 0.8)).tolist() == [[False, True, True, True]]
    assert torch.isfinite(keep_top_p(logits, 0.01)).tolist() == [[False, True, False, False]]  # top one always
    kept = keep_top_p(logits, 0.6)
    assert kept[0, 1] == logits[0, 1]  # kept logits are unchanged


def test_top_p_works_row_by_row() -> None:
    logits = torch.cat([_logits(0.7, 0.2, 0.1), _logits(0.34, 0.36, 0.3)])
    assert torch.isfinite(keep_top_p(logits, 0.6)).tolist() == [[True, False, False], [True, True, False]]


def test_temperature_sharpens_and_flattens() -> None:
    logits = _logits(0.6, 0.3, 0.1)
    entropy = lambda x: -(x.softmax(-1) * x.log_softmax(-1)).sum().item()
    assert entropy(process_logits(logits, 0.5)) < entropy(logits) < entropy(process_logits(logits, 2.0))
    torch.testing.assert_close(process_logits(logits, 1.0), logits)


def test_sampled_frequencies_follow_the_processed_distribution() -> None:
    logits = _logits(0.5, 0.3, 0.15, 0.05).expand(20000, -1)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(next_tokens(logits, 1.0, top_k=3, generator=gen), minlength=4).float() / 20000
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    torch.testing.assert_close(counts, expected, rtol=0, atol=0.02)
    assert counts[3] == 0  # outside the top k: never drawn
    counts = torch.bincount(next_tokens(logits, 1.0, top_p=0.7, generator=gen), minlength=4).float() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), rtol=0, atol=0.02)
    assert counts[2:].sum() == 0


def test_greedy_ignores_top_k_top_p_and_the_generator() -> None:
    logits = torch.tensor([[0.1, 2.0, 1.9], [3.0, -1.0, 2.0]])
    assert next_tokens(logits, 0.0, top_k=1, top_p=0.1).tolist() == [1, 0]


def test_seeded_generator_reproduces_samples() -> None:
    logits = torch.randn(4, 50)
    draws = [next_tokens(logits, 0.8, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*draws)


@pytest.mark.parametrize(
    "options,message",
    [({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")],
)
def test_bad_options_fail_clearly(options: dict, message: str) -> None:
    from llmkit.generation.sampling import check_options

    values = {"temperature": 1.0, "top_k": None, "top_p": None, **options}
    with pytest.raises(ValueError, match=message):
        check_options(values["temperature"], values["top_k"], values["top_p"])

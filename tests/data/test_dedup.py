"""Exact and MinHash/LSH near-duplicate detection: planted duplicates found, distinct documents kept, estimates sound."""

from __future__ import annotations

import random

import numpy as np
import pytest

from llmkit.data.dedup import (
    ExactDuplicateFilter,
    NearDuplicateFilter,
    estimated_jaccard,
    jaccard,
    lsh_params,
    shingle_set,
)


def _vocab(seed: int = 0, size: int = 3000) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(size)]


def _doc(rng: random.Random, vocab: list[str], n_words: int = 300) -> str:
    return " ".join(rng.choices(vocab, k=n_words))


def _change_words(text: str, positions: list[int]) -> str:
    words = text.split()
    for i in positions:
        words[i] = "changed"
    return " ".join(words)


def test_exact_filter_flags_only_repeats() -> None:
    exact = ExactDuplicateFilter()
    assert [exact.is_duplicate(t) for t in ["a", "b", "a", "a ", "b"]] == [False, False, True, False, True]
    assert len(exact) == 3


def test_jaccard_helper() -> None:
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard(set(), set()) == 1.0


def test_signature_is_deterministic_and_depends_on_seed() -> None:
    text = _doc(random.Random(1), _vocab())
    sig = NearDuplicateFilter(num_perm=64).signature(text)
    assert sig.shape == (64,) and sig.dtype == np.uint32
    assert np.array_equal(sig, NearDuplicateFilter(num_perm=64).signature(text))
    assert not np.array_equal(sig, NearDuplicateFilter(num_perm=64, seed=1).signature(text))


@pytest.mark.parametrize("changed", [3, 30, 80, 150])
def test_estimated_jaccard_tracks_true_jaccard_of_word_shingles(changed: int) -> None:
    rng = random.Random(changed)
    a = _doc(rng, _vocab())
    b = _change_words(a, rng.sample(range(300), changed))
    near = NearDuplicateFilter(num_perm=256)
    true = jaccard(shingle_set(a), shingle_set(b))
    assert abs(estimated_jaccard(near.signature(a), near.signature(b)) - true) < 0.1


def test_short_documents_use_character_ngrams() -> None:
    a = "The quick brown fox jumps over the lazy dog near the old river bank today."
    b = a.replace("lazy", "sleepy")
    assert all(len(s) == 5 for s in shingle_set(a))  # character 5-grams of the lowercased words
    near = NearDuplicateFilter(num_perm=256)
    true = jaccard(shingle_set(a), shingle_set(b))
    assert true > 0.7  # word 5-grams would give 6/16 here
    assert abs(estimated_jaccard(near.signature(a), near.signature(b)) - true) < 0.1


@pytest.mark.parametrize(("threshold", "num_perm"), [(0.5, 128), (0.8, 128), (0.9, 256), (0.7, 64)])
def test_lsh_bands_put_the_s_curve_near_the_threshold(threshold: float, num_perm: int) -> None:
    bands, rows = lsh_params(threshold, num_perm)
    assert bands * rows <= num_perm
    assert abs((1 / bands) ** (1 / rows) - threshold) < 0.1  # where 1-(1-s^r)^b rises steepest
    s = np.array([threshold - 0.3, threshold, threshold + 0.05])
    p = 1 - (1 - s**rows) ** bands
    assert p[0] < 0.15  # well below: rarely a candidate
    assert p[1] > 0.75 and p[2] > 0.93  # at or just above: almost always (false negatives weigh more)


def test_planted_near_duplicates_found_and_distinct_documents_kept() -> None:
    rng, vocab = random.Random(0), _vocab()
    distinct = [(f"doc{i}", _doc(rng, vocab)) for i in range(50)]
    header = "Copyright notice: this page is part of the example archive and is provided as is without warranty " * 2
    boilerplate = [(f"page{i}", header + _doc(rng, vocab, 200)) for i in range(10)]
    original = distinct[7][1]
    planted = [
        ("few_words_changed", _change_words(original, [40, 140, 240])),
        ("paragraph_appended", original + "\n\n" + _doc(rng, vocab, 30)),
    ]
    near = NearDuplicateFilter(threshold=0.8)
    assert [near.is_duplicate(name, text) for name, text in distinct + boilerplate] == [None] * 60
    assert [near.is_duplicate(name, text) for name, text in planted] == ["doc7", "doc7"]
    assert len(near) == 60  # duplicates are not indexed


def test_unrelated_near_miss_below_threshold_is_kept() -> None:
    rng, vocab = random.Random(2), _vocab()
    a = _doc(rng, vocab)
    b = _change_words(a, list(range(0, 300, 4)))  # every 4th word: almost no word 5-gram survives
    near = NearDuplicateFilter(threshold=0.8)
    assert near.is_duplicate("a", a) is None
    assert near.is_duplicate("b", b) is None


def test_bad_options_fail_clearly() -> None:
    with pytest.raises(ValueError, match="bands must be in"):
        NearDuplicateFilter(num_perm=128, bands=129)
    with pytest.raises(ValueError, match="threshold"):
        NearDuplicateFilter(threshold=1.5)
    with pytest.raises(TypeError, match="shingle"):
        NearDuplicateFilter(shingle=3)  # type: ignore[call-arg]

"""Deterministic splits: by document hash (stable under additions) or by tail."""

from __future__ import annotations

import pytest

from llmkit.data.splits import split_documents

DOCS = [(f"doc{i}", f"text {i}") for i in range(2000)]


def test_hash_split_is_stable_when_documents_are_added() -> None:
    before = split_documents(DOCS[:1000], "hash", 0.1, 0.05)
    after = split_documents(DOCS, "hash", 0.1, 0.05)
    for split in ("train", "val", "test"):
        assert set(before[split]) <= set(after[split])


def test_hash_split_fractions_are_close_and_disjoint() -> None:
    parts = split_documents(DOCS, "hash", 0.1, 0.05)
    sizes = {k: len(v) for k, v in parts.items()}
    assert sum(sizes.values()) == len(DOCS)
    assert 150 <= sizes["val"] <= 250 and 60 <= sizes["test"] <= 140  # binomial, > 3 sigma
    names = [{n for n, _ in v} for v in parts.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])


def test_hash_split_by_text_ignores_names() -> None:
    renamed = [(f"other{i}", t) for i, (_, t) in enumerate(DOCS)]
    a = split_documents(DOCS, "hash", 0.2, key="text")
    b = split_documents(renamed, "hash", 0.2, key="text")
    assert [t for _, t in a["val"]] == [t for _, t in b["val"]]


def test_tail_split_cuts_the_concatenated_text() -> None:
    parts = split_documents([("f", "a" * 80 + "b" * 10 + "c" * 10)], "tail", 0.1, 0.1)
    assert [t for _, t in parts["train"]] == ["a" * 80]
    assert [t for _, t in parts["val"]] == ["b" * 10] and [t for _, t in parts["test"]] == ["c" * 10]


@pytest.mark.parametrize(("split", "val", "test", "match"), [
    ("random", 0.1, 0.0, "unknown data.split 'random'"), ("hash", 0.6, 0.5, "must be in"), ("hash", -0.1, 0.0, "must be in"),
])
def test_bad_settings_raise(split: str, val: float, test: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_documents(DOCS[:10], split, val, test)

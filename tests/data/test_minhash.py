"""The vectorised MinHash: the shingles it hashes are exactly dedup.shingle_set's, a document's signature does not
depend on its batch, and planted near duplicates are found with no distinct document removed."""

from __future__ import annotations

import random
import re

import numpy as np

from llmkit.data.dedup import NearDuplicateFilter
from llmkit.data.minhash import MinHasher, shingle_hashes

_WORD = re.compile(r"\w+")


def _reference_shingles(text: str, n: int = 5) -> list[str]:
    """Every shingle occurrence, the way shingle_set defines them, with re."""
    words = _WORD.findall(text.lower())
    if len(words) >= 50:
        return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    flat = " ".join(words)
    return [flat[i : i + n] for i in range(max(1, len(flat) - n + 1))]


def _texts(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abc déf_ GHİ 12 ×→ çß ñ\n\t.,;ЖЯ中文 \u0301\U0001f600"  # İ lowercases to two characters
    texts = ["", " ", "...", "a", "ab cd", "xxx"]
    texts += ["".join(rng.choices(alphabet, k=rng.randint(0, 300))) for _ in range(150)]
    texts += [" ".join(rng.choices(["alpha", "beta", "gamma", "δέλτα", "e"], k=rng.randint(45, 90))) for _ in range(60)]
    rng.shuffle(texts)
    return texts


def test_hashed_shingles_are_the_reference_shingles() -> None:
    texts = _texts()
    weights = np.random.default_rng(0).integers(0, 1 << 62, size=5, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    hashes, counts = shingle_hashes(texts, 5, weights)
    offsets = np.cumsum(counts) - counts
    seen: dict[str, int] = {}
    for text, start, count in zip(texts, offsets, counts, strict=True):
        reference = _reference_shingles(text)
        assert count == len(reference), repr(text)
        for shingle, h in zip(reference, hashes[start : start + count].tolist(), strict=True):
            assert seen.setdefault(shingle, h) == h  # one shingle, one hash, in every document
    assert len(set(seen.values())) == len(seen)  # and distinct shingles, distinct hashes


def test_a_signature_does_not_depend_on_its_batch() -> None:
    texts = _texts(1)
    hasher = MinHasher(num_perm=64)
    whole = hasher.signatures(texts)
    assert whole.shape == (len(texts), 64) and whole.dtype == np.uint32
    assert np.array_equal(whole, np.concatenate([hasher.signatures(texts[i : i + 7]) for i in range(0, len(texts), 7)]))
    assert np.array_equal(whole[3], hasher.signatures([texts[3]])[0])


def test_planted_near_duplicates_found_and_distinct_documents_kept() -> None:
    """A small version of scripts/bench_dedup.py's benchmark: every group keeps exactly one document."""
    rng = random.Random(0)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    originals = [" ".join(rng.choices(vocab, k=rng.randint(180, 330))) for _ in range(800)]
    docs = [(f"{i}/original", t) for i, t in enumerate(originals)]
    for k in range(120):
        i = rng.randrange(len(originals))
        words = originals[i].split()
        for j in rng.sample(range(len(words)), k=2):
            words[j] = rng.choice(vocab)
        docs.append((f"{i}/near{k}", " ".join(words) if k % 2 else originals[i] + " " + " ".join(rng.choices(vocab, k=8))))
    rng.shuffle(docs)
    matches = NearDuplicateFilter().duplicates([name for name, _ in docs], [text for _, text in docs])
    removed = {name for (name, _), match in zip(docs, matches, strict=True) if match is not None}
    kept_per_group: dict[str, int] = {}
    for name, _ in docs:
        kept_per_group[name.split("/")[0]] = kept_per_group.get(name.split("/")[0], 0) + (name not in removed)
    assert set(kept_per_group.values()) == {1}


def test_batched_dedup_answers_as_one_document_at_a_time() -> None:
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(300)]
    base = [" ".join(rng.choices(vocab, k=rng.randint(60, 120))) for _ in range(60)]
    texts = base + [t.replace(t.split()[5], "x", 1) for t in base[:20]] + base[:5] + ["short text", "short text!"]
    rng.shuffle(texts)
    names = [f"d{i}" for i in range(len(texts))]
    one_by_one = NearDuplicateFilter(threshold=0.7)
    expected = [one_by_one.is_duplicate(n, t) for n, t in zip(names, texts, strict=True)]
    batched = NearDuplicateFilter(threshold=0.7)
    half = len(texts) // 2  # two calls: the second also looks up the documents the first indexed
    got = batched.duplicates(names[:half], texts[:half]) + batched.duplicates(names[half:], texts[half:])
    assert got == expected and sum(m is not None for m in got) >= 25 and len(batched) == len(one_by_one)

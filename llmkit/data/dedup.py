"""Exact and near-duplicate detection: SHA-256 digests, and MinHash signatures (llmkit/data/minhash.py) indexed with
LSH banding.

The near-duplicate rule, the same in one process and across any number of tasks (llmkit/data/prep/dedup.py): visit
documents in input order; a document is a near duplicate when an earlier *kept* document shares one of its LSH bands
and their signatures agree on at least `threshold` of their values (the estimated Jaccard similarity of their shingle
sets). Duplicates are not indexed, so in a chain a~b~c with a and c unlike each other, a and c are kept.

Shingles are word 5-grams (lowercased `\\w+` tokens), the usual choice for web-scale near-dedup: robust to whitespace
and punctuation edits, and one changed word touches only `ngram` shingles. Documents with fewer than `SHORT_DOC_WORDS`
words use character n-grams of those tokens instead, because a handful of word shingles make the Jaccard estimate
too coarse (one changed word in a 20-word text removes a quarter of them).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Hashable, Sequence

import numpy as np

from llmkit.data.minhash import SHORT_DOC_WORDS, MinHasher

_WORD = re.compile(r"\w+")
# fixed odd weights that fold a band's rows into one 64-bit bucket key (the same in every process: Python's hash()
# of bytes is salted per process, and bucket keys travel between tasks)
_BAND_WEIGHTS = np.random.default_rng(0x15A).integers(0, 1 << 63, size=64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).digest()


class ExactDuplicateFilter:
    """Remembers the SHA-256 of every text it has seen."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        digest = text_digest(text)
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False

    def __len__(self) -> int:
        return len(self._seen)


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: one key per band of `rows` signature values; equal bands give equal keys everywhere."""
    n = len(signatures)
    values = signatures[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    weights = np.resize(_BAND_WEIGHTS, rows)
    keys = (values * weights).sum(axis=2, dtype=np.uint64)  # wraps mod 2**64
    keys ^= keys >> np.uint64(29)
    keys *= np.uint64(0xBF58476D1CE4E5B9)
    keys ^= keys >> np.uint64(32)
    return keys


class LSHIndex:
    """Signatures of kept documents in LSH buckets; a query confirms its candidates on whole signatures.

    Bucket keys are band keys salted by band, in one table: salted key -> first document, and the rare further
    documents of the same bucket apart. Document ids follow input order, so ties go to the earliest document."""

    def __init__(self, threshold: float, bands: int, rows: int) -> None:
        self.threshold, self.bands, self.rows = threshold, bands, rows
        self._salts = np.arange(bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        self._first: dict[int, int] = {}
        self._more: dict[int, list[int]] = {}
        self._signatures: list[np.ndarray] = []  # by document id, kept or not
        self._names: dict[int, Hashable] = {}  # kept documents only

    def salted(self, keys: np.ndarray) -> np.ndarray:
        """(n, bands) band keys -> the table's keys."""
        return keys ^ self._salts

    def match_or_add(self, ident: Hashable, signature: np.ndarray, salted: Sequence[int]) -> Hashable | None:
        """The id of the kept document this one nearly duplicates; None if none, and then it is indexed as `ident`.
        `salted`: the document's salted band keys, as Python ints."""
        return self.match_or_add_at(self.reserve(signature[None]), ident, salted)

    def reserve(self, signatures: np.ndarray) -> int:
        """Document ids for a batch, in input order: the first one."""
        first = len(self._signatures)
        self._signatures.extend(signatures)
        return first

    def match_or_add_at(self, doc: int, ident: Hashable, salted: Sequence[int]) -> Hashable | None:
        """match_or_add for a document whose id `reserve` gave."""
        match = self._best_match(self._signatures[doc], salted)
        if match is None:
            self._add(doc, ident, salted)
        return match

    def add_unmatched(self, docs: np.ndarray, idents: Sequence[Hashable], salted: np.ndarray) -> None:
        """Index reserved documents known to share no bucket with an indexed document or with each other, in bulk."""
        self._names.update(zip(docs.tolist(), idents, strict=True))
        self._first.update(zip(salted.ravel().tolist(), np.repeat(docs, self.bands).tolist(), strict=True))

    def known(self, salted: np.ndarray) -> np.ndarray:
        """Which of these salted keys name a bucket already in the index."""
        first = self._first
        return np.fromiter((key in first for key in salted.ravel().tolist()), bool, count=salted.size).reshape(salted.shape)

    def __len__(self) -> int:
        return len(self._names)

    def _best_match(self, signature: np.ndarray, salted: Sequence[int]) -> Hashable | None:
        first, more = self._first, self._more
        ids = {first[key] for key in salted if key in first}
        if not ids:
            return None
        ids.update(doc for key in salted for doc in more.get(key, ()))
        ordered = sorted(ids)  # ties go to the earliest document
        agreement = (np.stack([self._signatures[i] for i in ordered]) == signature).mean(axis=1)
        best = int(np.argmax(agreement))
        return self._names[ordered[best]] if agreement[best] >= self.threshold else None

    def _add(self, doc: int, ident: Hashable, salted: Sequence[int]) -> None:
        self._names[doc] = ident
        for key in salted:
            if key in self._first:
                self._more.setdefault(key, []).append(doc)
            else:
                self._first[key] = doc


class NearDuplicateFilter:
    """MinHash signatures, LSH buckets for candidates, and estimated Jaccard >= threshold to confirm them."""

    def __init__(
        self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 0, bands: int | None = None
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near_dedup threshold must be in (0, 1], got {threshold}")
        if bands is not None and not 1 <= bands <= num_perm:
            raise ValueError(f"near_dedup bands must be in [1, num_perm={num_perm}], got {bands}")
        self.hasher = MinHasher(num_perm, ngram, seed)
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        self.bands, self.rows = (bands, num_perm // bands) if bands else lsh_params(threshold, num_perm)
        self.index = LSHIndex(threshold, self.bands, self.rows)

    def signature(self, text: str) -> np.ndarray:
        """The (num_perm,) uint32 MinHash signature: per permutation, the least permuted shingle hash."""
        return self.hasher.signatures([text])[0]

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32, computed in batches: far faster per document than `signature`."""
        return self.hasher.signatures(texts)

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        return band_keys(signatures, self.bands, self.rows)

    def is_duplicate(self, name: str, text: str, signature: np.ndarray | None = None) -> str | None:
        """The name of the indexed document this one nearly duplicates; None if none, and then `name` is indexed.
        Pass `signature` when it was computed already (in a batch, by `signatures`)."""
        sig = self.signature(text) if signature is None else signature
        salted = self.index.salted(self.band_keys(sig[None]))[0].tolist()
        return self.index.match_or_add(name, sig, salted)  # type: ignore[return-value]

    def duplicates(self, names: Sequence[str], texts: Sequence[str]) -> list[str | None]:
        """is_duplicate for each document in order, the same answers, computed in batches: signatures and bucket
        keys for all at once, and the documents that share no bucket with another one or with the index (most of
        them: they can neither be a duplicate nor make one) indexed in bulk, without a lookup each."""
        signatures = self.signatures(texts)
        salted = self.index.salted(self.band_keys(signatures))
        _, inverse, counts = np.unique(salted, return_inverse=True, return_counts=True)
        shared = (counts[inverse.ravel()] > 1).reshape(salted.shape) | self.index.known(salted)
        candidate = shared.any(axis=1)
        matches: list[str | None] = [None] * len(names)
        first = self.index.reserve(signatures)
        lone = np.flatnonzero(~candidate)
        self.index.add_unmatched(first + lone, [names[i] for i in lone], salted[lone])
        for i in np.flatnonzero(candidate).tolist():
            matches[i] = self.index.match_or_add_at(first + i, names[i], salted[i].tolist())  # type: ignore[assignment]
        return matches

    def __len__(self) -> int:
        return len(self.index)


@functools.lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, false_positive_weight: float = 0.1) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm whose S-curve 1-(1-s**rows)**bands best separates at threshold.

    Minimises the weighted areas of false positives (similarity below threshold, yet a candidate) and false
    negatives. False negatives weigh 9x by default: candidates are confirmed by their whole signatures, so a false
    positive costs one comparison while a false negative is a duplicate missed for good. bands*rows may fall short
    of num_perm (as in datasketch): 128 = 2**7 alone would allow only 8 curves; confirmation still uses every value.
    """
    s = np.linspace(0.0, 1.0, 2001)
    below, above = s < threshold, s >= threshold

    def cost(bands_rows: tuple[int, int]) -> float:
        bands, rows = bands_rows
        p = 1.0 - (1.0 - s**rows) ** bands
        return false_positive_weight * p[below].sum() + (1.0 - false_positive_weight) * (1.0 - p[above]).sum()

    return min(((b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)), key=cost)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The fraction of agreeing MinHash values: an unbiased estimate of the shingle sets' Jaccard similarity."""
    return float(np.mean(a == b))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def shingle_set(text: str, ngram: int = 5) -> set[str]:
    """The shingles whose Jaccard similarity a signature estimates, as strings (for tests and inspection)."""
    words = _WORD.findall(text.lower())
    if len(words) >= SHORT_DOC_WORDS:
        return {" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1)}
    flat = " ".join(words)
    return {flat[i : i + ngram] for i in range(max(1, len(flat) - ngram + 1))}

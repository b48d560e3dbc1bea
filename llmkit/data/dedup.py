"""Exact and near-duplicate detection: sha256 content hashes, and MinHash signatures indexed with LSH banding.

Not `datasketch`: it is not installed, and its per-shingle Python loop is slow; here one document's shingles
are hashed under all permutations at once in numpy.

Shingles are word 5-grams (lowercased `\\w+` tokens), the usual choice for web-scale near-dedup: robust to
whitespace and punctuation edits, and one changed word touches only `ngram` shingles. Documents with fewer than
`SHORT_DOC_WORDS` words use character n-grams of those tokens instead, because a handful of word shingles make the
Jaccard estimate too coarse (one changed word in a 20-word text removes a quarter of them).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

SHORT_DOC_WORDS = 50
_MERSENNE61 = np.uint64((1 << 61) - 1)
_LOW31 = np.uint64((1 << 31) - 1)
_LOW30 = np.uint64((1 << 30) - 1)
_CHUNK = 2048  # shingles per block: bounds memory for huge documents, and (num_perm, 2048) blocks stay in cache
_WORD = re.compile(r"\w+")


class ExactDuplicateFilter:
    """Remembers the sha256 of every text it has seen."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).digest()
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False

    def __len__(self) -> int:
        return len(self._seen)


class NearDuplicateFilter:
    """MinHash signatures, LSH buckets for candidates, and estimated Jaccard >= threshold to confirm them."""

    def __init__(
        self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 0, bands: int | None = None
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near_dedup threshold must be in (0, 1], got {threshold}")
        if ngram < 1 or num_perm < 1:
            raise ValueError(f"near_dedup ngram and num_perm must be >= 1, got ngram={ngram}, num_perm={num_perm}")
        if bands is not None and not 1 <= bands <= num_perm:
            raise ValueError(f"near_dedup bands must be in [1, num_perm={num_perm}], got {bands}")
        self.threshold, self.num_perm, self.ngram = threshold, num_perm, ngram
        self.bands, self.rows = (bands, num_perm // bands) if bands else lsh_params(threshold, num_perm)
        rng = np.random.default_rng(seed)
        a = rng.integers(1, _MERSENNE61, size=(num_perm, 1), dtype=np.uint64)
        self._a_lo, self._a_hi = a & _LOW31, a >> np.uint64(31)  # split so the products fit in 64 bits (_permute)
        self._b = rng.integers(0, _MERSENNE61, size=(num_perm, 1), dtype=np.uint64)
        self._word_hashes: dict[str, int] = {}
        self._buckets: list[dict[int, list[int]]] = [{} for _ in range(self.bands)]
        self._signatures: list[np.ndarray] = []
        self._names: list[str] = []

    def signature(self, text: str) -> np.ndarray:
        """The (num_perm,) uint64 MinHash signature: per permutation, the least permuted shingle hash."""
        x = np.unique(self._shingle_hashes(text)) >> np.uint64(3)  # 61 bits: below 2**61, as _permute needs
        return np.min([self._permute(x[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)], axis=0)

    def is_duplicate(self, name: str, text: str) -> str | None:
        """The name of the indexed document this one nearly duplicates; None if none, and then `name` is indexed."""
        sig = self.signature(text)
        keys = [hash(band.tobytes()) for band in sig[: self.bands * self.rows].reshape(self.bands, self.rows)]
        match = self._best_match(sig, keys)
        if match is None:
            self._index(name, sig, keys)
        return match

    def __len__(self) -> int:
        return len(self._names)

    def _best_match(self, sig: np.ndarray, keys: list[int]) -> str | None:
        candidates: set[int] = set()
        for bucket, key in zip(self._buckets, keys, strict=True):
            candidates.update(bucket.get(key, ()))
        if not candidates:
            return None
        ids = sorted(candidates)  # sorted: ties go to the earliest document, whatever the set order
        agreement = (np.stack([self._signatures[i] for i in ids]) == sig).mean(axis=1)
        best = int(np.argmax(agreement))
        return self._names[ids[best]] if agreement[best] >= self.threshold else None

    def _index(self, name: str, sig: np.ndarray, keys: list[int]) -> None:
        doc = len(self._names)
        self._names.append(name)
        self._signatures.append(sig)
        for bucket, key in zip(self._buckets, keys, strict=True):
            bucket.setdefault(key, []).append(doc)

    def _shingle_hashes(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.lower())
        if len(words) >= SHORT_DOC_WORDS:
            return _ngram_hashes(np.array([self._word_hash(w) for w in words], dtype=np.uint64), self.ngram)
        codepoints = np.frombuffer(" ".join(words).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        return _ngram_hashes(_mix64(codepoints), self.ngram)

    def _word_hash(self, word: str) -> int:
        h = self._word_hashes.get(word)
        if h is None:
            if len(self._word_hashes) > 1_000_000:  # a cache, not an index: bound its memory on huge vocabularies
                self._word_hashes.clear()
            h = self._word_hashes[word] = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
        return h

    def _permute(self, x: np.ndarray) -> np.ndarray:
        """min over shingles of (a*x + b) mod (2**61 - 1), per permutation; x < 2**61, shape (m,) -> (num_perm,).

        a*x needs 122 bits, so with a = a_hi*2**31 + a_lo and x = x_hi*2**31 + x_lo (halves below 2**31) it is
        a_hi*x_hi*2**62 + mid*2**31 + a_lo*x_lo, and 2**61 = 1 (mod p) folds each term below 2**62.
        """
        x_lo, x_hi = x & _LOW31, x >> np.uint64(31)
        s = self._a_hi * x_hi
        s <<= np.uint64(1)  # 2**62 = 2 (mod p); a_hi*x_hi < 2**60
        mid = self._a_hi * x_lo
        mid += self._a_lo * x_hi  # < 2**62
        s += mid >> np.uint64(30)  # mid*2**31 = (mid >> 30)*2**61 + (mid & LOW30)*2**31
        mid &= _LOW30
        mid <<= np.uint64(31)
        s += mid
        s += self._a_lo * x_lo
        s += self._b  # total < 2**61 + 2**32 + 2**61 + 2**62 + 2**61 < 2**64: no overflow
        s = (s & _MERSENNE61) + (s >> np.uint64(61))  # now <= p + 7
        np.subtract(s, _MERSENNE61, out=s, where=s >= _MERSENNE61)
        return s.min(axis=1)


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


def _ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """One 64-bit hash per run of n consecutive token hashes (one run of all tokens when there are fewer)."""
    if len(tokens) == 0:
        return _mix64(np.zeros(1, dtype=np.uint64))
    n = min(n, len(tokens))
    m = len(tokens) - n + 1
    h = tokens[:m].copy()
    for k in range(1, n):
        h *= np.uint64(0x9E3779B97F4A7C15)  # order matters: "a b" and "b a" hash differently
        h += tokens[k : k + m]
        h = _mix64(h)
    return _mix64(h)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit flips about half the output bits (uint64 arithmetic wraps)."""
    z = z ^ (z >> np.uint64(30))
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z

"""MinHash signatures of many documents at once, in numpy: no Python loop over words, shingles or permutations.

A batch of documents (about `BATCH_CHARS` characters) goes through a fixed sequence of array operations:

    text -> code points -> word spans (a lookup table of \\w characters) -> one 64-bit hash per word (a polynomial
    over the code points, taken from prefix sums) -> one 64-bit hash per shingle (a weighted sum of `ngram`
    consecutive token hashes, mixed) -> per permutation, a * x mod 2**32 over blocks of shingles -> minimum per
    document (np.minimum.reduceat)

Shingles are those of `dedup.shingle_set`: word n-grams of the lowercased `\\w+` tokens, or, for documents of fewer
than `SHORT_DOC_WORDS` words, character n-grams of those words joined by single spaces; a token sequence shorter
than n is one shingle. The permutations are the maps x -> a*x (mod 2**32, a odd) of the high 32 bits of
the shingle hash: a bijection each, one array pass each, in 32-bit lanes (twice as many per vector instruction as
the 61-bit Mersenne arithmetic this replaced). Their quality is measured, not assumed: over 1,200 document pairs the
estimates' errors, in units of the ideal sqrt(J(1-J)/num_perm), had mean 0.02 and spread 0.98 (with an additive
term, a*x + b, 0.01 and 1.00: it bought nothing and cost a pass); tests/data/test_dedup.py checks the estimates
against true Jaccard similarities and scripts/bench_dedup.py the recall on planted duplicates.

Why blocks: on these machines a pass over an array that fits in cache is tens of times faster than one over an
array in memory, so every intermediate array here is sized to stay in cache (`BATCH_CHARS`, `PERM_BLOCK`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

SHORT_DOC_WORDS = 50
BATCH_CHARS = 1 << 16  # characters per batch: keeps code points, word and shingle hashes in cache
PERM_BLOCK = 1024  # shingles per permutation block: (num_perm, 1024) uint32 = 512 KiB at 128 permutations
_U64 = np.uint64
_POLY = _U64(0x100000001B3)  # odd, so invertible mod 2**64: a word's hash is independent of where it starts
_POLY_INV = _U64(pow(int(_POLY), -1, 1 << 64))
_EMPTY = _U64(0x5EED5EED5EED5EED)  # the one token of a document without words
_CHAR_SALT = _U64(0x51)


class MinHasher:
    """(documents) -> (n, num_perm) uint32 MinHash signatures; a function of (num_perm, ngram, seed) alone."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 0) -> None:
        if ngram < 1 or num_perm < 1:
            raise ValueError(f"near_dedup ngram and num_perm must be >= 1, got ngram={ngram}, num_perm={num_perm}")
        self.num_perm, self.ngram = num_perm, ngram
        rng = np.random.default_rng(seed)
        self._a = (rng.integers(0, 1 << 32, size=(num_perm, 1), dtype=np.uint64) | 1).astype(np.uint32)
        # one odd weight per position in a shingle, so that "a b" and "b a" hash differently
        self._weights = rng.integers(0, 1 << 63, size=ngram, dtype=np.uint64) * _U64(2) + _U64(1)
        self._buffer = np.empty((num_perm, PERM_BLOCK), np.uint32)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32; the same rows whatever the batch a text is hashed in."""
        out = np.empty((len(texts), self.num_perm), np.uint32)
        for lo, hi in _batches(texts):
            out[lo:hi] = self._batch(texts[lo:hi])
        return out

    def _batch(self, texts: Sequence[str]) -> np.ndarray:
        shingles, counts = shingle_hashes(texts, self.ngram, self._weights)
        x = (shingles >> _U64(32)).astype(np.uint32)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        parts, owners = [], []
        for lo in range(0, len(x), PERM_BLOCK):
            hi = min(lo + PERM_BLOCK, len(x))
            block = self._buffer[:, : hi - lo]
            np.multiply(self._a, x[lo:hi], out=block)  # uint32 arithmetic wraps: mod 2**32
            first = np.searchsorted(bounds, lo, side="right") - 1  # the document the block starts in
            starts = np.concatenate([[lo], bounds[first + 1 : np.searchsorted(bounds, hi)]])
            parts.append(np.minimum.reduceat(block, starts - lo, axis=1))
            owners.append(np.arange(first, first + len(starts)))
        # a document cut by a block boundary has one partial minimum per block: take the least
        partial, owner = np.concatenate(parts, axis=1), np.concatenate(owners)
        return np.minimum.reduceat(partial, np.searchsorted(owner, np.arange(len(texts))), axis=1).T


def _batches(texts: Sequence[str]) -> list[tuple[int, int]]:
    """[lo, hi) ranges of about BATCH_CHARS characters (a longer document is a batch of its own)."""
    ranges, lo, size = [], 0, 0
    for i, text in enumerate(texts):
        size += len(text)
        if size >= BATCH_CHARS:
            ranges.append((lo, i + 1))
            lo, size = i + 1, 0
    if lo < len(texts):
        ranges.append((lo, len(texts)))
    return ranges


def shingle_hashes(texts: Sequence[str], ngram: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hashes of every document's shingles, concatenated; shingles per document, each >= 1)."""
    code, doc_starts = _code_points(texts)
    word_starts, word_ends = _word_spans(code)
    first_word = np.searchsorted(word_starts, doc_starts)
    n_words = np.diff(np.append(first_word, len(word_starts)))
    word_hashes = _word_hashes(code, word_starts, word_ends)
    long = n_words >= SHORT_DOC_WORDS
    counts = np.empty(len(texts), np.int64)
    streams = []
    if long.any():  # word n-grams straight from the word hashes (other documents' words in between are skipped)
        streams.append((long, *_gram_hashes(word_hashes, first_word[long], n_words[long], weights)))
    if not long.all():
        short = ~long
        tokens, starts, lengths = _short_doc_chars(code, word_starts, word_ends, first_word[short], n_words[short])
        streams.append((short, *_gram_hashes(tokens, starts, lengths, weights)))
    for docs, _, n in streams:
        counts[docs] = n
    if len(streams) == 1:  # all documents long, or all short: the stream is in document order already
        return streams[0][1], counts
    offsets = np.cumsum(counts) - counts
    out = np.empty(int(counts.sum()), _U64)
    for docs, grams, n in streams:
        out[_ranges(offsets[docs], n)] = grams
    return out, counts


def _code_points(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Lowercased code points of all texts, joined by one space (never a word character); each text's start."""
    lowered = [t.lower() for t in texts]
    lengths = np.fromiter(map(len, lowered), np.int64, count=len(lowered))
    joined = " ".join(lowered)
    if joined.isascii():  # the common case: one byte per character
        code = np.frombuffer(joined.encode("ascii"), np.uint8)
    else:
        code = np.frombuffer(joined.encode("utf-32-le", errors="surrogatepass"), np.uint32)
    return code, np.cumsum(lengths + 1) - (lengths + 1)


def _word_spans(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of every run of word characters: what re's \\w+ finds in the same text."""
    if code.dtype == np.uint8:  # bytes.translate maps a byte through a table several times faster than numpy indexing
        is_word = np.frombuffer(bytes(code.base).translate(_ascii_word_bytes()), np.int8)  # base: the encoded text
    else:
        is_word = _word_table(True)[code].view(np.int8)
    edges = np.diff(is_word, prepend=np.int8(0), append=np.int8(0))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


@functools.cache
def _ascii_word_bytes() -> bytes:
    return _word_table(False).astype(np.uint8).tobytes()


@functools.cache
def _word_table(unicode: bool) -> np.ndarray:
    """Per code point: is it a \\w character (str.isalnum() or "_", as re defines it for str patterns)?"""
    size = 0x110000 if unicode else 256
    table = np.fromiter((chr(c).isalnum() for c in range(size)), bool, count=size)  # ~0.2 s once, for non-ASCII
    table[ord("_")] = True
    return table


def _word_hashes(code: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """sum_j code[s + j] * POLY**j per word, from one prefix sum: (H[e] - H[s]) * POLY**-s (mod 2**64)."""
    powers, inverse = _powers(len(code) + 1)
    prefix = np.zeros(len(code) + 1, _U64)
    np.cumsum(code * powers[: len(code)], out=prefix[1:])
    return _mix64((prefix[ends] - prefix[starts]) * inverse[starts] + (ends - starts).astype(_U64))


@functools.lru_cache(maxsize=4)
def _powers_of_size(size: int) -> tuple[np.ndarray, np.ndarray]:
    def cumulative(base: np.uint64) -> np.ndarray:
        values = np.full(size, base, _U64)
        values[0] = 1
        return np.cumprod(values)  # uint64 products wrap: powers mod 2**64

    return cumulative(_POLY), cumulative(_POLY_INV)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    size = 1 << max(int(n - 1).bit_length(), 17)  # powers of two: a few tables serve every batch
    return _powers_of_size(size)


def _short_doc_chars(
    code: np.ndarray, word_starts: np.ndarray, word_ends: np.ndarray, first_word: np.ndarray, n_words: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token hashes of the characters of " ".join(words) per document (one _EMPTY token without words)."""
    words = _ranges(first_word, n_words)
    word_len = word_ends[words] - word_starts[words]
    chars = code[_ranges(word_starts[words], word_len)].astype(_U64)
    word_at = np.cumsum(word_len) - word_len  # where each word begins in `chars`
    not_first = np.ones(len(words), bool)
    not_first[(np.cumsum(n_words) - n_words)[n_words > 0]] = False
    chars = np.insert(chars, word_at[not_first], _U64(ord(" ")))
    doc_of_word = np.repeat(np.arange(len(n_words)), n_words)
    lengths = np.bincount(doc_of_word, weights=word_len + not_first, minlength=len(n_words)).astype(np.int64)
    empty = np.flatnonzero(lengths == 0)
    tokens = _mix64(chars + _CHAR_SALT)
    if len(empty):  # one _EMPTY token each, so that every document has a shingle
        starts = np.cumsum(lengths) - lengths
        tokens = np.insert(tokens, starts[empty], _EMPTY)
        lengths[empty] = 1
    return tokens, np.cumsum(lengths) - lengths, lengths


def _gram_hashes(
    tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the n-grams inside each [start, start + length) of `tokens` (one gram of all tokens when length < n),
    in document order, and how many each document has."""
    n = len(weights)
    padded = np.concatenate([tokens, np.zeros(n, _U64)])  # every position starts a gram; pads only feed discarded ones
    grams = np.zeros(len(tokens), _U64)
    short = lengths < n
    whole = np.empty(int(short.sum()), _U64)  # the one gram of a document shorter than n tokens
    for k in range(n):
        grams += padded[k : k + len(tokens)] * weights[k]
        done = short & (lengths == k + 1)
        whole[done[short]] = grams[starts[done]]
    counts = np.where(short, 1, lengths - n + 1)
    picked = grams[_ranges(starts, counts)]
    picked[(np.cumsum(counts) - counts)[short]] = whole
    return _mix64(picked), counts


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)]), without the loop."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    keep = lengths > 0
    starts, lengths = np.asarray(starts, np.int64)[keep], lengths[keep]
    steps = np.ones(total, np.int64)
    heads = np.cumsum(lengths) - lengths
    steps[0] = starts[0]
    steps[heads[1:]] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
    return np.cumsum(steps)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit flips about half the output bits (uint64 arithmetic wraps)."""
    z = z ^ (z >> _U64(30))
    z *= _U64(0xBF58476D1CE4E5B9)
    z ^= z >> _U64(27)
    z *= _U64(0x94D049BB133111EB)
    z ^= z >> _U64(31)
    return z

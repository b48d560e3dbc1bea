"""Streaming: disjoint (rank, worker) reads that cover each epoch once, exact resume, mixing, packing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from llmkit.data.encode import ShardWriter
from llmkit.data.streaming import (
    EndlessBatchIndices,
    Mixture,
    PackedSequences,
    RandomWindows,
    TokenStream,
    TrainBatches,
    ValidationWindows,
)

T, B = 8, 4


def make_stream(tmp_path: Path, doc_lengths: list[int], shard_tokens: int = 50, name: str = "s") -> TokenStream:
    """Token i of the stream has id i (unique), so reads can be checked exactly."""
    (tmp_path / name).mkdir(exist_ok=True)
    writer = ShardWriter(tmp_path / name, "train", np.dtype(np.uint16), shard_tokens)
    offset = 0
    for n in doc_lengths:
        writer.add(np.arange(offset, offset + n, dtype=np.uint16))
        offset += n
    entries = writer.close()
    return TokenStream([tmp_path / name / e["file"] for e in entries], entries, np.dtype(np.uint16))


@pytest.fixture
def stream(tmp_path: Path) -> TokenStream:
    return make_stream(tmp_path, [13, 40, 7, 100, 31, 50, 2, 18])  # 261 tokens over 6 shards


def test_reads_cross_shard_boundaries(stream: TokenStream) -> None:
    assert stream.total == 261 and len(stream.shards) == 6
    assert stream.read(45, 20).tolist() == list(range(45, 65))
    starts = np.array([45, 0, 51, 240, 3, 100])  # rows inside one shard and rows across boundaries
    assert stream.read_rows(starts, 20).tolist() == [list(range(s, s + 20)) for s in starts]
    assert stream.doc_starts.tolist() == [0, 13, 53, 60, 160, 191, 241, 243]


def test_document_layout_restarts_positions_and_counts_segments(stream: TokenStream) -> None:
    # tokens 10..17: doc 0 ends at 12, doc 1 starts at 13
    positions, segments = (a[0] for a in stream.document_layout(np.array([10]), 8))
    assert positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]  # a document begun before the window restarts at 0
    assert segments.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    positions, segments = (a[0] for a in stream.document_layout(np.array([50]), 12))  # doc 1 -> doc 2 (53) -> doc 3 (60)
    assert segments.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2]
    assert positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0, 1]
    # rows are independent: a batch of windows gives each window's own layout
    starts = np.array([10, 50, 0, 55, 150])
    positions, segments = stream.document_layout(starts, 12)
    for row, start in enumerate(starts):
        one = stream.document_layout(np.array([start]), 12)
        assert positions[row].tolist() == one[0][0].tolist() and segments[row].tolist() == one[1][0].tolist()
    assert positions[2].tolist() == list(range(12)) and segments[4].tolist() == [0] * 10 + [1] * 2  # doc 4 starts at 160


@pytest.mark.parametrize("doc_lengths", [[3] * 80, [1, 2, 40, 1, 1, 90, 5, 60], [300]])
def test_both_layout_paths_agree(tmp_path: Path, doc_lengths: list[int]) -> None:
    """The per-boundary loop (few documents per row) and the vectorised pass (many) give the same layout."""
    stream = make_stream(tmp_path, doc_lengths, shard_tokens=64)
    starts = np.array([0, 5, 17, stream.total - 30])
    first = np.searchsorted(stream.doc_starts, starts, side="right")
    last = np.searchsorted(stream.doc_starts, starts + 24, side="left")
    loop = stream._layout_by_boundary(starts, first, last, 24)
    vectorised = stream._layout_vectorised(starts, first, last, 24)
    assert all((a == b).all() for a, b in zip(loop, vectorised, strict=True))
    for row, start in enumerate(starts):  # and both match the definition, token by token
        for t in range(24):
            begin = max(int(stream.doc_starts[stream.doc_starts <= start + t].max()), int(start))
            assert loop[0][row, t] == start + t - begin
            assert loop[1][row, t] == ((stream.doc_starts > start) & (stream.doc_starts <= start + t)).sum()


class WithWorker(Dataset):
    """Tags each batch with the DataLoader worker that produced it."""

    def __init__(self, inner: TrainBatches) -> None:
        self.inner = inner

    def __getitem__(self, k: int):
        info = get_worker_info()
        return k, (info.id if info else 0), self.inner[k][0]


def _read_by_rank_and_worker(stream: TokenStream, world: int, workers: int, steps: int) -> dict[tuple[int, int], list]:
    seen: dict[tuple[int, int], list] = {}
    for rank in range(world):
        batches = TrainBatches([PackedSequences(stream, T, seed=3)], Mixture([1.0], 3), B, rank, world)
        loader = DataLoader(WithWorker(batches), batch_size=None, sampler=EndlessBatchIndices(), num_workers=workers)
        for step, (k, worker, x) in zip(range(steps), loader, strict=False):
            assert k == step
            seen.setdefault((rank, worker), []).append(x)
    return seen


@pytest.mark.parametrize(("world", "workers"), [(1, 2), (2, 2), (4, 0)])
def test_rank_worker_streams_are_disjoint_and_cover_the_epoch_once(tmp_path: Path, world: int, workers: int) -> None:
    stream = make_stream(tmp_path, [20] * 19 + [5])  # 385 tokens: 48 sequences of 8
    n = PackedSequences(stream, T, 0).n
    assert n == 48 and n % (world * B) == 0
    seen = _read_by_rank_and_worker(stream, world, workers, steps=n // (world * B))
    assert len(seen) == world * max(workers, 1)  # every (rank, worker) pair did read
    tokens = torch.cat([torch.cat(xs).flatten() for xs in seen.values()]).tolist()
    assert sorted(tokens) == list(range(n * T))  # each token exactly once as an input this epoch
    # and no two pairs read the same sequence
    firsts = [set(x[:, 0].tolist()) for xs in seen.values() for x in xs]
    assert sum(len(f) for f in firsts) == len(set().union(*firsts))


def test_epochs_are_reshuffled_and_each_covers_every_sequence(stream: TokenStream) -> None:
    packed = PackedSequences(stream, T, seed=5)
    epoch0 = [packed.start(i) for i in range(packed.n)]
    epoch1 = [packed.start(i) for i in range(packed.n, 2 * packed.n)]
    assert sorted(epoch0) == sorted(epoch1) == [i * T for i in range(packed.n)]
    assert epoch0 != epoch1
    assert [PackedSequences(stream, T, seed=5, shuffle=False).start(i) for i in range(3)] == [0, T, 2 * T]


def test_worker_count_does_not_change_batches(stream: TokenStream) -> None:
    batches = TrainBatches([PackedSequences(stream, T, seed=1)], Mixture([1.0], 1), B)

    def first(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(batches, batch_size=None, sampler=EndlessBatchIndices(), num_workers=workers)
        return [x for _, (x, _) in zip(range(6), loader, strict=False)]

    for a, b in zip(first(0), first(2), strict=True):
        assert torch.equal(a, b)


def _global_samples(stream: TokenStream, world: int, steps: int, start_sample: int = 0) -> list[list[int]]:
    """Per step, the global batch: first token of every row, rank 0's rows first."""
    out = []
    for k in range(steps):
        row = []
        for rank in range(world):
            batches = TrainBatches([PackedSequences(stream, T, 9)], Mixture([1.0], 9), B, rank, world, start_sample)
            row += batches[k][0][:, 0].tolist()
        out.append(row)
    return out


@pytest.mark.parametrize("stop", [1, 3, 7])
def test_resume_from_the_sample_count_continues_exactly(stream: TokenStream, stop: int) -> None:
    uninterrupted = _global_samples(stream, world=2, steps=12)
    resumed = _global_samples(stream, world=2, steps=12 - stop, start_sample=stop * 2 * B)
    assert resumed == uninterrupted[stop:]


def test_resume_under_another_number_of_ranks_continues_the_same_sample_sequence(stream: TokenStream) -> None:
    flat = [s for step in _global_samples(stream, world=4, steps=6) for s in step]
    before = [s for step in _global_samples(stream, world=2, steps=3) for s in step]  # 3 steps on 2 ranks
    after = [s for step in _global_samples(stream, world=4, steps=3, start_sample=len(before)) for s in step]
    assert before + after == flat[: len(before) + len(after)]


def test_batches_carry_document_layout_when_masking(stream: TokenStream) -> None:
    batches = TrainBatches([PackedSequences(stream, T, 2)], Mixture([1.0], 2), B, document_mask=True)
    x, y, positions, segments = batches[0]
    assert x.shape == y.shape == positions.shape == segments.shape == (B, T)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in range(B):
        start = int(x[row, 0])
        expected = stream.document_layout(np.array([start]), T)
        assert positions[row].tolist() == expected[0][0].tolist() and segments[row].tolist() == expected[1][0].tolist()
        # a new segment begins exactly where a document starts
        starts = {int(s) for s in stream.doc_starts}
        assert all((int(x[row, t]) in starts) == (segments[row, t] != segments[row, t - 1]) for t in range(1, T))


def test_mixture_weights_hold(tmp_path: Path) -> None:
    weights = [0.6, 0.3, 0.1]
    mixture = Mixture(weights, seed=0, block=1000)
    located = [mixture.locate(j) for j in range(20_000)]
    counts = Counter(c for c, _ in located)
    for c, w in enumerate(weights):
        assert counts[c] == 20_000 * w  # exact per block of 1000
        mine = [i for cc, i in located if cc == c]
        assert mine == list(range(len(mine)))  # each component's samples in order, none skipped or repeated
    # within any window of 500 samples the shares stay within 5 binomial standard deviations
    for start in range(0, 19_500, 250):
        window = Counter(c for c, _ in located[start : start + 500])
        for c, w in enumerate(weights):
            assert abs(window[c] - 500 * w) <= 5 * (500 * w * (1 - w)) ** 0.5


def test_mixture_draws_from_each_component(tmp_path: Path) -> None:
    a = make_stream(tmp_path, [100], name="a")
    b = make_stream(tmp_path, [60], name="b")  # ids 0..59 too: tell them apart by the component index
    batches = TrainBatches([PackedSequences(a, T, 0), PackedSequences(b, T, 1)], Mixture([0.75, 0.25], 0, block=4), B)
    components = [batches.mixture.locate(j)[0] for j in range(16)]
    assert Counter(components) == {0: 12, 1: 4}
    assert batches[0][0].shape == (B, T)


@pytest.mark.parametrize("weights", [[], [1.0, -0.5], [0.0, 0.0], [1.0, 1e-6]])
def test_bad_mixture_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="mixture weight"):
        Mixture(weights, 0)


def test_random_windows_are_a_pure_function_of_seed_and_index(stream: TokenStream) -> None:
    a, b = RandomWindows(stream, T, 1), RandomWindows(stream, T, 2)
    starts = [a.start(i) for i in range(500)]
    assert starts == [RandomWindows(stream, T, 1).start(i) for i in range(500)]
    assert starts != [b.start(i) for i in range(500)]
    assert min(starts) >= 0 and max(starts) <= stream.total - T - 1
    assert len(set(starts)) > 200  # spread over the stream


def test_validation_set_is_fixed_and_split_across_ranks(stream: TokenStream) -> None:
    full = ValidationWindows([stream], [1.0], T, max_windows=10)
    assert [int(full[i][0][0]) for i in range(len(full))] == [i * T for i in range(10)]
    parts = [ValidationWindows([stream], [1.0], T, 10, rank, 3) for rank in range(3)]
    assert sorted(int(p[i][0][0]) for p in parts for i in range(len(p))) == [i * T for i in range(10)]
    with pytest.raises(ValueError, match="fewer than 3 ranks"):
        ValidationWindows([stream], [1.0], 200, 10, 0, 3)


def test_too_few_tokens(stream: TokenStream) -> None:
    with pytest.raises(ValueError, match="too few"):
        PackedSequences(stream, 300, 0)
    with pytest.raises(ValueError, match="too few"):
        RandomWindows(stream, 300, 0)

"""Datasets and the resumable sampler: shapes, shifts, determinism, resume, rank sharding."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from llmkit.data.datasets import RandomWindowBatches, ResumableBatchSampler, SequentialWindows

T, B = 16, 4


@pytest.fixture
def tokens() -> np.ndarray:
    # distinct values in random order: a window's first value tells where it starts
    return np.random.default_rng(0).permutation(5000).astype(np.uint16)


def _start(tokens: np.ndarray, first_value: int) -> int:
    [where] = np.flatnonzero(tokens == first_value)
    return int(where)


# ---- RandomWindowBatches -------------------------------------------------------------------------
def test_random_batches_are_shifted_windows_of_the_array(tokens: np.ndarray) -> None:
    ds = RandomWindowBatches(tokens, T, B, seed=1)
    for k in range(5):
        x, y = ds[k]
        assert x.shape == y.shape == (B, T)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])
        for row in range(B):
            s = _start(tokens, int(x[row, 0]))
            assert s + T < len(tokens)
            assert x[row].tolist() == tokens[s : s + T].tolist()
            assert y[row].tolist() == tokens[s + 1 : s + T + 1].tolist()


def test_random_batches_stay_in_bounds_on_a_tiny_array() -> None:
    tiny = np.arange(T + 2, dtype=np.uint16)
    ds = RandomWindowBatches(tiny, T, B, seed=0)
    for k in range(20):
        x, y = ds[k]
        assert x[:, 0].tolist() == [0] * B  # the only window that fits with its target
        assert y[:, -1].tolist() == [T] * B


@pytest.mark.parametrize("n", [0, T, T + 1])
def test_random_batches_reject_too_few_tokens(n: int) -> None:
    with pytest.raises(ValueError, match="too few"):
        RandomWindowBatches(np.arange(n, dtype=np.uint16), T, B, seed=0)


def test_random_batches_are_deterministic_per_seed_rank_and_index(tokens: np.ndarray) -> None:
    a = RandomWindowBatches(tokens, T, B, seed=7, rank=0)
    b = RandomWindowBatches(tokens.copy(), T, B, seed=7, rank=0)
    for k in [0, 1, 5, 123, 10_000]:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
    # and independent of the order in which batches are read
    late = a[123][0]
    assert torch.equal(RandomWindowBatches(tokens, T, B, seed=7)[123][0], late)

    assert not torch.equal(a[0][0], a[1][0])
    assert not torch.equal(a[3][0], RandomWindowBatches(tokens, T, B, seed=7, rank=1)[3][0])
    assert not torch.equal(a[3][0], RandomWindowBatches(tokens, T, B, seed=8, rank=0)[3][0])


# ---- ResumableBatchSampler -----------------------------------------------------------------------
def test_sampler_yields_consecutive_global_indices_without_end() -> None:
    assert list(islice(ResumableBatchSampler(), 5)) == [0, 1, 2, 3, 4]
    assert list(islice(ResumableBatchSampler(), 10_000))[-1] == 9_999
    # a second pass starts over: the sampler itself holds no position
    sampler = ResumableBatchSampler(start=3)
    assert list(islice(sampler, 3)) == [3, 4, 5]
    assert list(islice(sampler, 3)) == [3, 4, 5]


@pytest.mark.parametrize("consumed", [0, 1, 7, 1000])
def test_sampler_resume_yields_exactly_the_rest(consumed: int) -> None:
    uninterrupted = list(islice(ResumableBatchSampler(), consumed + 50))
    resumed = list(islice(ResumableBatchSampler(start=consumed), 50))
    assert resumed == uninterrupted[consumed:]


# ---- SequentialWindows ---------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sequential_windows_partition_across_ranks(tokens: np.ndarray, world: int) -> None:
    n_windows = (len(tokens) - 1) // T
    shards = [SequentialWindows(tokens, T, max_windows=10_000, rank=r, world_size=world) for r in range(world)]
    starts = [_start(tokens, int(ds[i][0][0])) for ds in shards for i in range(len(ds))]
    assert sorted(starts) == [i * T for i in range(n_windows)]  # disjoint and covering, non-overlapping
    assert sum(len(ds) for ds in shards) == n_windows
    assert max(len(ds) for ds in shards) - min(len(ds) for ds in shards) <= 1
    x, y = shards[-1][len(shards[-1]) - 1]
    assert x.shape == y.shape == (T,)
    assert torch.equal(y[:-1], x[1:])
    s = _start(tokens, int(x[0]))
    assert y.tolist() == tokens[s + 1 : s + T + 1].tolist()


def test_sequential_windows_cap_and_last_window() -> None:
    tokens = np.arange(3 * T + 1, dtype=np.uint16)  # exactly 3 windows with targets
    ds = SequentialWindows(tokens, T, max_windows=100)
    assert len(ds) == 3
    x, y = ds[2]
    assert x.tolist() == list(range(2 * T, 3 * T))
    assert y.tolist() == list(range(2 * T + 1, 3 * T + 1))
    capped = [SequentialWindows(tokens, T, max_windows=2, rank=r, world_size=2) for r in range(2)]
    assert [capped[r][0][0][0].item() for r in range(2)] == [0, T]
    assert [len(d) for d in capped] == [1, 1]


def test_sequential_windows_reject_too_few_tokens() -> None:
    with pytest.raises(ValueError, match="too few"):
        SequentialWindows(np.arange(T, dtype=np.uint16), T, max_windows=10)
    with pytest.raises(ValueError, match="too few"):
        SequentialWindows(np.arange(2 * T + 1, dtype=np.uint16), T, max_windows=10, rank=0, world_size=3)


# ---- DataLoader ----------------------------------------------------------------------------------
def _batches(tokens: np.ndarray, num_workers: int, start: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = DataLoader(
        RandomWindowBatches(tokens, T, B, seed=3), batch_size=None, sampler=ResumableBatchSampler(start),
        num_workers=num_workers,
    )
    return list(islice(loader, n))


def test_worker_count_does_not_change_batches(tokens: np.ndarray) -> None:
    serial = _batches(tokens, 0, start=3, n=9)
    parallel = _batches(tokens, 2, start=3, n=9)
    assert len(serial) == len(parallel) == 9
    ds = RandomWindowBatches(tokens, T, B, seed=3)
    for k, (xs, ys), (xp, yp) in zip(range(3, 12), serial, parallel, strict=True):
        assert xs.shape == (B, T)
        assert torch.equal(xs, xp) and torch.equal(ys, yp)
        assert torch.equal(xs, ds[k][0]) and torch.equal(ys, ds[k][1])


def test_resumed_loader_continues_the_uninterrupted_one(tokens: np.ndarray) -> None:
    uninterrupted = _batches(tokens, 0, start=0, n=12)
    resumed = _batches(tokens, 2, start=5, n=7)
    for (x, y), (ux, uy) in zip(resumed, uninterrupted[5:], strict=True):
        assert torch.equal(x, ux) and torch.equal(y, uy)

"""LMDataModule without a Trainer: the cache, loaders, checkpoint state and exact resume."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
import torch

import llmkit.data.datamodule as datamodule_module
from llmkit.data import LMDataModule
from llmkit.data.sources import stdlib_corpus

SEQ_LEN, BATCH = 16, 4


@pytest.fixture(scope="module")
def realistic_text() -> str:
    return "\n\n".join(text for _, text in stdlib_corpus(max_bytes=12_000))


@pytest.fixture
def text_file(tmp_path: Path, realistic_text: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(realistic_text, encoding="utf-8")
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _dm(path: Path, cache: Path, **overrides) -> LMDataModule:
    settings = dict(
        source="text", path=str(path), tokenizer="char", split="tail", seq_len=SEQ_LEN, batch_size=BATCH,
        cache_dir=str(cache),
    )
    settings.update(overrides)
    return LMDataModule(**settings)


def _ready(path: Path, cache: Path, **overrides) -> LMDataModule:
    dm = _dm(path, cache, **overrides)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


# ---- the cache -----------------------------------------------------------------------------------
def test_prepare_data_creates_one_cache_directory(text_file: Path, cache: Path) -> None:
    _dm(text_file, cache).prepare_data()
    [name] = _entries(cache)
    assert name.startswith("text-char-")
    assert sorted(p.name for p in (cache / name).iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]


def test_second_prepare_data_reuses_the_cache(text_file: Path, cache: Path, monkeypatch) -> None:
    _dm(text_file, cache).prepare_data()
    [name] = _entries(cache)
    meta = cache / name / "meta.json"
    stamp = meta.stat().st_mtime_ns, meta.stat().st_ino

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached corpus was rebuilt")

    monkeypatch.setattr(datamodule_module, "build_tokenized", no_rebuild)
    again = _dm(text_file, cache)
    again.prepare_data()
    assert _entries(cache) == [name]
    assert (meta.stat().st_mtime_ns, meta.stat().st_ino) == stamp
    again.setup("fit")
    assert again.corpus.directory == cache / name
    # settings that do not change the tokens do not change the cache either
    _dm(text_file, cache, seq_len=8, batch_size=2, seed=1, val_windows=3, num_workers=1).prepare_data()
    assert _entries(cache) == [name]


def test_setup_without_prepare_data_finds_the_cache(text_file: Path, cache: Path) -> None:
    # other ranks of a node call setup() only
    first = _ready(text_file, cache)
    other = _dm(text_file, cache)
    other.setup("fit")
    assert other.corpus.directory == first.corpus.directory
    assert other.tokenizer.fingerprint == first.tokenizer.fingerprint


def test_changed_text_gets_a_new_cache(text_file: Path, cache: Path) -> None:
    _dm(text_file, cache).prepare_data()
    [old] = _entries(cache)
    text_file.write_text(text_file.read_text() + "\nmore text at the end\n")
    dm = _dm(text_file, cache)
    dm.prepare_data()
    assert len(_entries(cache)) == 2
    dm.setup()
    assert dm.corpus.directory.name != old
    assert dm.corpus.meta["documents"] == 1


def test_changed_vocab_size_gets_a_new_cache(text_file: Path, cache: Path) -> None:
    small = _ready(text_file, cache, tokenizer="bpe", vocab_size=400)
    assert _entries(cache) == [small.corpus.directory.name]
    assert small.corpus.directory.name.startswith("text-bpe-")
    large = _ready(text_file, cache, tokenizer="bpe", vocab_size=480)
    assert len(_entries(cache)) == 2
    assert large.corpus.directory != small.corpus.directory
    assert large.vocab_size > small.vocab_size
    assert large.tokenizer.fingerprint != small.tokenizer.fingerprint


# ---- what the model sees -------------------------------------------------------------------------
def test_loaders_give_batches_of_the_right_shape(text_file: Path, cache: Path, realistic_text: str) -> None:
    dm = _ready(text_file, cache, val_windows=10)
    assert dm.trainer is None
    train_text = realistic_text[: int(len(realistic_text) * 0.9)]
    assert dm.vocab_size == dm.corpus.meta["vocab_size"] == len(set(train_text)) + 1

    train = dm.train_dataloader()
    # training is counted in steps: the loader has no end, also beyond one pass over the split
    n_batches = dm.corpus.meta["tokens"]["train"] // (BATCH * SEQ_LEN) + 5
    assert len(list(islice(train, n_batches))) == n_batches
    x, y = next(iter(train))
    assert x.shape == y.shape == (BATCH, SEQ_LEN)
    assert x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert int(x.max()) < dm.vocab_size

    val = dm.val_dataloader()
    batches = list(val)
    assert [len(b[0]) for b in batches] == [BATCH, BATCH, 2]  # 10 windows in batches of 4
    vx, vy = batches[0]
    assert vx.shape == vy.shape == (BATCH, SEQ_LEN)
    # validation is the tail of the text, read in order
    tokens = dm.corpus.tokens("val")
    assert vx[0].tolist() == tokens[:SEQ_LEN].tolist()
    assert vx[1].tolist() == tokens[SEQ_LEN : 2 * SEQ_LEN].tolist()
    assert dm.tokenizer.decode(tokens[:SEQ_LEN].tolist()) == realistic_text[int(len(realistic_text) * 0.9) :][:SEQ_LEN]


def test_train_batches_are_deterministic_across_datamodules(text_file: Path, cache: Path) -> None:
    def first_inputs(dm: LMDataModule) -> list[torch.Tensor]:
        return [batch[0] for batch in islice(dm.train_dataloader(), 5)]

    first = first_inputs(_ready(text_file, cache))
    second = first_inputs(_ready(text_file, cache))
    other_seed = first_inputs(_ready(text_file, cache, seed=2))
    assert len(first) == len(second) == len(other_seed) == 5
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other_seed, strict=True))
    assert not torch.equal(first[0], first[1])


# ---- checkpoint state ----------------------------------------------------------------------------
def test_state_dict_without_trainer(text_file: Path, cache: Path) -> None:
    dm = _ready(text_file, cache)
    state = dm.state_dict()
    assert state == {
        "batches_consumed": 0, "tokenizer_fingerprint": dm.tokenizer.fingerprint, "vocab_size": dm.vocab_size,
        "corpus": dm.corpus.directory.name, "tokenizer": dm.tokenizer.to_state(),
    }


def test_load_state_dict_rejects_another_tokenizer(text_file: Path, cache: Path, tmp_path: Path) -> None:
    other_file = tmp_path / "other.txt"
    other_file.write_text("only a few letters here\n" * 200)
    other_state = _ready(other_file, cache).state_dict()
    dm = _ready(text_file, cache)
    with pytest.raises(ValueError, match="tokenizer") as info:
        dm.load_state_dict(other_state)
    assert other_state["corpus"] in str(info.value) and dm.corpus.directory.name in str(info.value)
    with pytest.raises(ValueError, match="tokenizer"):
        dm.load_state_dict({"batches_consumed": 3})  # no fingerprint at all
    # nothing was half-applied: training still starts at batch 0
    fresh = next(iter(_ready(text_file, cache).train_dataloader()))[0]
    assert torch.equal(next(iter(dm.train_dataloader()))[0], fresh)


@pytest.mark.parametrize("consumed", [0, 1, 7, 1000])
def test_resume_skips_exactly_the_consumed_batches(text_file: Path, cache: Path, consumed: int) -> None:
    fresh = _ready(text_file, cache)
    # 1000 batches are more than one pass over the training split
    assert 1000 * BATCH * SEQ_LEN > fresh.corpus.meta["tokens"]["train"]
    uninterrupted = list(islice(fresh.train_dataloader(), consumed + 20))

    state = fresh.state_dict()
    state["batches_consumed"] = consumed
    resumed = _ready(text_file, cache)
    resumed.load_state_dict(state)
    rest = list(islice(resumed.train_dataloader(), 20))
    for (x, y), (ux, uy) in zip(rest, uninterrupted[consumed:], strict=True):
        assert torch.equal(x, ux) and torch.equal(y, uy)

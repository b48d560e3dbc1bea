"""LMDataModule without a Trainer: preparation and reuse, loaders, checkpoint state, bad input."""

from __future__ import annotations

import json
import shutil
from itertools import islice
from pathlib import Path

import pytest
import torch

import llmkit.data.prep.encode as prep_encode
import llmkit.data.prep.pipeline as pipeline
from llmkit.data import LMDataModule
from llmkit.data.shards import MANIFEST, ShardError
from llmkit.data.sources import stdlib_corpus
from llmkit.text.tokenizer import CharTokenizer

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
        cache_dir=str(cache), progress=False,
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


# ---- preparation and reuse -----------------------------------------------------------------------
def test_prepare_data_writes_one_dataset_directory(text_file: Path, cache: Path) -> None:
    dm = _ready(text_file, cache)
    [name] = _entries(cache)
    assert name.startswith("text-char-") and dm.data_dir() == cache / name
    files = {p.relative_to(cache / name).as_posix() for p in (cache / name).rglob("*") if p.is_file()}
    assert {MANIFEST, "text/cleaning_report.json", "text/train_00000.bin", "text/val_00000.bin"} <= files
    assert {"text/clean/train.jsonl", "text/clean/val.jsonl", "text/clean/test.jsonl"} <= files
    manifest = json.loads((cache / name / MANIFEST).read_text())
    assert manifest["tokenizer_fingerprint"] == dm.tokenizer.fingerprint and manifest["dtype"] == "uint16"


def test_second_prepare_data_reuses_the_dataset(text_file: Path, cache: Path, monkeypatch) -> None:
    first = _ready(text_file, cache)
    manifest = first.data_dir() / MANIFEST
    stamp = manifest.stat().st_mtime_ns, manifest.stat().st_ino

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the prepared dataset was rebuilt")

    monkeypatch.setattr(pipeline, "clean_components", no_rebuild)
    again = _ready(text_file, cache)
    assert _entries(cache) == [first.data_dir().name]
    assert (manifest.stat().st_mtime_ns, manifest.stat().st_ino) == stamp
    assert again.dataset.fingerprint == first.dataset.fingerprint
    # settings that do not change the tokens do not change the dataset either
    _dm(text_file, cache, seq_len=8, batch_size=2, seed=1, val_windows=3, num_workers=1, document_mask=True).prepare_data()


def test_setup_without_prepare_data_finds_the_dataset(text_file: Path, cache: Path) -> None:
    first = _ready(text_file, cache)  # other ranks of a node call setup() only
    other = _dm(text_file, cache)
    other.setup("fit")
    assert other.data_dir() == first.data_dir() and other.tokenizer.fingerprint == first.tokenizer.fingerprint


def test_changed_text_or_vocab_gets_a_new_dataset(text_file: Path, cache: Path) -> None:
    old = _ready(text_file, cache).data_dir()
    text_file.write_text(text_file.read_text() + "\nmore text at the end\n")
    changed = _ready(text_file, cache).data_dir()
    bpe = _ready(text_file, cache, tokenizer="bpe", vocab_size=400)
    assert len({old, changed, bpe.data_dir()}) == 3 and len(_entries(cache)) == 3
    assert bpe.data_dir().name.startswith("text-bpe-")


def test_failed_preparation_leaves_nothing_and_keeps_existing_datasets(text_file: Path, cache: Path, monkeypatch) -> None:
    kept = _ready(text_file, cache).data_dir()
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "encode_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _dm(text_file, cache, vocab_size=999, tokenizer="bpe").prepare_data()
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before  # no half-built directory
    assert (kept / MANIFEST).exists()


# ---- what the model sees -------------------------------------------------------------------------
def test_loaders_give_batches_of_the_right_shape(text_file: Path, cache: Path, realistic_text: str) -> None:
    dm = _ready(text_file, cache, val_windows=10)
    train_text = realistic_text[: int(len(realistic_text) * 0.9)]
    assert dm.vocab_size == len(set(train_text)) + 1

    train = dm.train_dataloader()
    # training is counted in steps: the loader has no end, also beyond one pass over the split
    n_batches = dm.dataset.tokens("train") // (BATCH * SEQ_LEN) + 5
    assert len(list(islice(train, n_batches))) == n_batches
    x, y = next(iter(train))
    assert x.shape == y.shape == (BATCH, SEQ_LEN) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and int(x.max()) < dm.vocab_size

    batches = list(dm.val_dataloader())
    assert [len(b[0]) for b in batches] == [BATCH, BATCH, 2]  # 10 windows in batches of 4
    vx, vy = batches[0]
    val_text = realistic_text[int(len(realistic_text) * 0.9) :]
    assert dm.tokenizer.decode(vx[0].tolist()) == val_text[:SEQ_LEN]  # validation: the tail, in order
    assert dm.tokenizer.decode(vx[1].tolist()) == val_text[SEQ_LEN : 2 * SEQ_LEN]


def test_document_mask_batches_have_four_fields(text_file: Path, cache: Path) -> None:
    dm = _ready(text_file, cache, document_mask=True)
    x, y, positions, segments = next(iter(dm.train_dataloader()))
    assert positions.shape == segments.shape == (BATCH, SEQ_LEN)
    assert len(next(iter(dm.val_dataloader()))) == 4


def test_train_batches_are_deterministic_across_datamodules(text_file: Path, cache: Path) -> None:
    def first_inputs(dm: LMDataModule) -> list[torch.Tensor]:
        return [batch[0] for batch in islice(dm.train_dataloader(), 5)]

    first = first_inputs(_ready(text_file, cache))
    second = first_inputs(_ready(text_file, cache))
    other_seed = first_inputs(_ready(text_file, cache, seed=2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other_seed, strict=True))


@pytest.mark.parametrize("sampling", ["epoch", "random"])
def test_unknown_and_known_sampling(text_file: Path, cache: Path, sampling: str) -> None:
    assert next(iter(_ready(text_file, cache, sampling=sampling).train_dataloader()))[0].shape == (BATCH, SEQ_LEN)
    with pytest.raises(ValueError, match="unknown data.sampling 'shuffle'; valid: epoch, random"):
        _dm(text_file, cache, sampling="shuffle")


# ---- checkpoint state ----------------------------------------------------------------------------
def test_state_dict_without_trainer(text_file: Path, cache: Path) -> None:
    dm = _ready(text_file, cache)
    assert dm.state_dict() == {
        "samples_consumed": 0, "global_step": 0, "data_fingerprint": dm.dataset.fingerprint,
        "tokenizer_fingerprint": dm.tokenizer.fingerprint, "vocab_size": dm.vocab_size,
        "dataset": dm.data_dir().name, "tokenizer": dm.tokenizer.to_state(),
    }


def test_load_state_dict_rejects_another_tokenizer(text_file: Path, cache: Path, tmp_path: Path) -> None:
    other_file = tmp_path / "other.txt"
    other_file.write_text("only a few letters here\n" * 200)
    other_state = _ready(other_file, cache).state_dict()
    dm = _ready(text_file, cache)
    with pytest.raises(ValueError, match="another tokenizer") as info:
        dm.load_state_dict(other_state)
    assert other_state["dataset"] in str(info.value) and dm.data_dir().name in str(info.value)
    with pytest.raises(ValueError, match="tokenizer"):
        dm.load_state_dict({"samples_consumed": 3, "global_step": 1})  # no fingerprint at all
    fresh = next(iter(_ready(text_file, cache).train_dataloader()))[0]
    assert torch.equal(next(iter(dm.train_dataloader()))[0], fresh)  # nothing was half-applied


def test_load_state_dict_rejects_other_data_with_the_same_tokenizer(text_file: Path, cache: Path) -> None:
    a = _ready(text_file, cache, shard_tokens=1000)
    b = _ready(text_file, cache, shard_tokens=2000)  # the same tokens, cut into other shards
    assert a.tokenizer.fingerprint == b.tokenizer.fingerprint and a.dataset.fingerprint != b.dataset.fingerprint
    with pytest.raises(ValueError, match="trained on other data.*data fingerprint"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("consumed", [0, 1, 7, 1000])
def test_resume_skips_exactly_the_consumed_batches(text_file: Path, cache: Path, consumed: int) -> None:
    fresh = _ready(text_file, cache)
    assert 1000 * BATCH * SEQ_LEN > fresh.dataset.tokens("train")  # beyond one epoch
    uninterrupted = list(islice(fresh.train_dataloader(), consumed + 20))
    state = {**fresh.state_dict(), "samples_consumed": consumed * BATCH, "global_step": consumed}
    resumed = _ready(text_file, cache)
    resumed.load_state_dict(state)
    rest = list(islice(resumed.train_dataloader(), 20))
    for (x, y), (ux, uy) in zip(rest, uninterrupted[consumed:], strict=True):
        assert torch.equal(x, ux) and torch.equal(y, uy)


# ---- damaged or mismatched data -----------------------------------------------------------------
def test_corrupt_shard_names_the_file(text_file: Path, cache: Path) -> None:
    directory = _ready(text_file, cache).data_dir()
    shard = directory / "text" / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"checksum mismatch for shard {shard}"):
        _dm(text_file, cache).setup()
    shard.write_bytes(bytes(data[:-7]))  # truncated: caught even without checksums
    dm = _dm(text_file, cache, verify="size")
    dm.setup()
    with pytest.raises(ShardError, match=f"{shard} is truncated"):
        next(iter(dm.train_dataloader()))
    assert shard.exists()  # the damaged file is reported, never deleted


def test_tokenizer_that_differs_from_the_shards_is_refused(text_file: Path, cache: Path, tmp_path: Path) -> None:
    directory = _ready(text_file, cache).data_dir()
    (tmp_path / "other.txt").write_text("xyz " * 100)
    other = _ready(tmp_path / "other.txt", cache)
    shutil.rmtree(directory / "tokenizer")
    shutil.copytree(other.data_dir() / "tokenizer", directory / "tokenizer")
    with pytest.raises(ShardError, match="is not the one the shards were written with"):
        _dm(text_file, cache).setup()


def test_dataset_empty_after_filtering(text_file: Path, cache: Path) -> None:
    with pytest.raises(ValueError, match="no training documents after cleaning") as info:
        _dm(text_file, cache, clean={"min_chars": 10**9}).prepare_data()
    assert "cleaning_report.json" in str(info.value)
    assert not cache.exists() or _entries(cache) == []


def test_vocabulary_too_large_for_the_dtype(text_file: Path, cache: Path, monkeypatch) -> None:
    def huge_vocabulary(*args, **kwargs):
        tokenizer = CharTokenizer("abc")
        tokenizer.vocab_size = 70_000
        return tokenizer

    monkeypatch.setattr(prep_encode, "train_tokenizer", huge_vocabulary)
    with pytest.raises(ValueError, match="70000 tokens does not fit in uint16 shards.*data.dtype=uint32"):
        _dm(text_file, cache, dtype="uint16").prepare_data()

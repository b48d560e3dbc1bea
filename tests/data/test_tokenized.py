"""Tokenized corpus on disk: dtype choice, splits, the atomic build, damage detection."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from llmkit.data.sources import stdlib_corpus
from llmkit.data.tokenized import TokenizedCorpus, build_tokenized, encode_documents, split_documents, token_dtype
from llmkit.data.tokenizer import CharTokenizer, load_tokenizer, train_tokenizer

SETTINGS = {"note": "echoed into meta.json"}


def _docs(n: int, prefix: str = "doc") -> list[tuple[str, str]]:
    return [(f"{prefix}{i}", f"text of {prefix} number {i}.\nsecond line {i}") for i in range(n)]


def _build(docs, out_dir: Path, kind: str = "char", vocab: int = 0, split: str = "tail", val_fraction: float = 0.1):
    return build_tokenized(docs, out_dir, kind, vocab, split, val_fraction, SETTINGS)


# ---- token_dtype ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("vocab_size", "dtype"),
    [(1, np.uint16), (256, np.uint16), (65535, np.uint16), (65536, np.uint16), (65537, np.uint32), (2**32, np.uint32)],
)
def test_token_dtype(vocab_size: int, dtype) -> None:
    assert token_dtype(vocab_size) == np.dtype(dtype)


def test_token_dtype_beyond_uint32_raises() -> None:
    with pytest.raises(ValueError, match="uint32"):
        token_dtype(2**32 + 1)


def test_encode_documents_largest_id_fits() -> None:
    class Big:  # a tokenizer whose largest id is exactly 65535
        vocab_size, eos_id = 65536, 65535

        def encode(self, text: str) -> list[int]:
            return [65534] * len(text)

    ids = encode_documents(Big(), ["ab", "c"])
    assert ids.dtype == np.uint16
    assert ids.tolist() == [65534, 65534, 65535, 65534, 65535]


def test_encode_documents_char_separates_with_blank_line() -> None:
    tok = CharTokenizer.train(["ab\n"])
    ids = encode_documents(tok, ["ab", "ba"])
    assert tok.decode(ids.tolist()) == "ab\n\nba\n\n"


# ---- split_documents -----------------------------------------------------------------------------
def test_tail_split_puts_last_fraction_in_val() -> None:
    docs = [("a", "x" * 60), ("b", "y" * 40)]
    parts = split_documents(docs, "tail", 0.1)
    text = "x" * 60 + "\n\n" + "y" * 40
    assert parts["train"][0] + parts["val"][0] == text
    assert len(parts["val"][0]) == len(text) - int(len(text) * 0.9)
    assert parts["val"][0] == "y" * len(parts["val"][0])
    assert len(parts["train"]) == len(parts["val"]) == 1
    bigger = split_documents(docs, "tail", 0.5)
    assert len(bigger["val"][0]) > len(parts["val"][0])


def test_hash_split_is_stable_when_documents_are_added() -> None:
    def membership(docs) -> dict[str, str]:
        parts = split_documents(docs, "hash", 0.2)
        where = {text: split for split in ("train", "val") for text in parts[split]}
        return {name: where[text] for name, text in docs}

    old = _docs(200)
    before = membership(old)
    assert 10 < list(before.values()).count("val") < 80  # about 20% of 200
    added = old + _docs(100, prefix="new")
    random.Random(0).shuffle(added)
    after = membership(added)
    assert {name: after[name] for name in before} == before
    assert "val" in {after[f"new{i}"] for i in range(100)}


def test_hash_split_fraction_extremes() -> None:
    docs = _docs(50)
    assert split_documents(docs, "hash", 0.0)["val"] == []
    assert split_documents(docs, "hash", 1.0)["train"] == []


def test_unknown_split_raises() -> None:
    with pytest.raises(ValueError, match="random") as info:
        split_documents(_docs(3), "random", 0.1)
    assert "hash, tail" in str(info.value)


# ---- build_tokenized -----------------------------------------------------------------------------
def test_build_char_writes_files_and_meta(tmp_path: Path) -> None:
    docs = [(name, text) for name, text in stdlib_corpus(max_bytes=30_000)]
    out = tmp_path / "cache" / "corpus"
    corpus = _build(docs, out)
    assert corpus.directory == out
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus"]  # no temp directory left

    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out)
    assert meta["dtype"] == "uint16"
    assert meta["vocab_size"] == tok.vocab_size
    assert meta["tokenizer_fingerprint"] == tok.fingerprint == corpus.tokenizer.fingerprint
    assert meta["documents"] == len(docs)
    assert meta["settings"] == SETTINGS
    for split in ("train", "val"):
        size = (out / f"{split}.bin").stat().st_size
        assert meta["tokens"][split] == size // 2 and size % 2 == 0 and size > 0

    # the bins decode back to the split text (+ the blank-line document separator)
    parts = split_documents(docs, "tail", 0.1)
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert tok.decode(train.tolist()) == parts["train"][0] + "\n\n"
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert val.tolist() == tok.encode(parts["val"][0] + "\n\n")


def test_build_bpe_separates_documents_with_eos(tmp_path: Path) -> None:
    docs = [(name, text) for name, text in stdlib_corpus(max_bytes=150_000)]
    out = tmp_path / "bpe"
    corpus = _build(docs, out, kind="bpe", vocab=500, split="hash", val_fraction=0.3)
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer.json").is_file()
    parts = split_documents(docs, "hash", 0.3)
    loaded = TokenizedCorpus.load(out)
    assert loaded.tokenizer.fingerprint == corpus.tokenizer.fingerprint
    eos = loaded.tokenizer.eos_id
    for split in ("train", "val"):
        tokens = loaded.tokens(split)
        assert len(tokens) == loaded.meta["tokens"][split]
        assert int((tokens == eos).sum()) == len(parts[split])
        assert tokens[-1] == eos
        first_doc = tokens[: int(np.argmax(tokens == eos))]
        assert loaded.tokenizer.decode(first_doc.tolist()) == parts[split][0]


def test_load_reads_what_build_wrote(tmp_path: Path) -> None:
    corpus = _build(_docs(20), tmp_path / "c")
    loaded = TokenizedCorpus.load(tmp_path / "c")
    assert loaded.meta == json.loads((tmp_path / "c" / "meta.json").read_text())
    for split in ("train", "val"):
        np.testing.assert_array_equal(loaded.tokens(split), corpus.tokens(split))
    assert loaded.tokenizer.fingerprint == corpus.tokenizer.fingerprint


@pytest.mark.parametrize(
    ("split", "val_fraction", "empty"), [("tail", 0.0, "val"), ("hash", 0.0, "val"), ("hash", 1.0, "train")]
)
def test_empty_split_raises_helpfully(tmp_path: Path, split: str, val_fraction: float, empty: str) -> None:
    out = tmp_path / "cache" / "c"
    with pytest.raises(ValueError, match=f"the {empty} split is empty") as info:
        _build(_docs(5), out, split=split, val_fraction=val_fraction)
    message = str(info.value)
    assert "5 documents" in message and f"split={split}" in message and "val_fraction" in message
    assert not out.exists()


def test_empty_document_list_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split is empty"):
        _build([], tmp_path / "c")


def test_truncated_bin_is_reported_with_its_path(tmp_path: Path) -> None:
    out = tmp_path / "c"
    _build(_docs(30), out)
    train = out / "train.bin"
    os.truncate(train, train.stat().st_size - 4)  # two uint16 tokens short
    corpus = TokenizedCorpus.load(out)
    with pytest.raises(ValueError, match="damaged") as info:
        corpus.tokens("train")
    assert str(train) in str(info.value)
    assert len(corpus.tokens("val")) == corpus.meta["tokens"]["val"]  # the other split is fine


@pytest.mark.parametrize("keep", ["odd", "empty"])
def test_badly_truncated_bin_is_reported_with_its_path(tmp_path: Path, keep: str) -> None:
    out = tmp_path / "c"
    _build(_docs(30), out)
    train = out / "train.bin"
    os.truncate(train, train.stat().st_size - 1 if keep == "odd" else 0)
    with pytest.raises(ValueError) as info:
        TokenizedCorpus.load(out).tokens("train")
    assert str(train) in str(info.value)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch, error) -> None:
    def broken_save(self, directory: Path) -> None:
        (directory / "tokenizer.json").write_text("half")
        raise error("disk full")

    monkeypatch.setattr(CharTokenizer, "save", broken_save)
    cache = tmp_path / "cache"
    with pytest.raises(error, match="disk full"):
        _build(_docs(20), cache / "corpus")
    assert cache.is_dir()
    assert list(cache.iterdir()) == []


def test_existing_complete_build_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "cache" / "corpus"
    _build(_docs(20), out)
    before = (out / "meta.json").read_text()
    train_before = (out / "train.bin").read_bytes()
    # a concurrent build of the same directory finishing second: the first copy stays
    _build(_docs(40), out)
    assert (out / "meta.json").read_text() == before
    assert (out / "train.bin").read_bytes() == train_before
    assert [p.name for p in out.parent.iterdir()] == ["corpus"]


def test_tokenizer_is_trained_on_train_split_only(tmp_path: Path) -> None:
    docs = [("a", "abc\n" * 50), ("b", "xyz\n" * 5)]  # with tail 0.1, "xyz" only appears in val
    corpus = _build(docs, tmp_path / "c", val_fraction=0.1)
    assert train_tokenizer("char", split_documents(docs, "tail", 0.1)["train"], 0).fingerprint == (
        corpus.tokenizer.fingerprint
    )
    assert 0 in corpus.tokens("val").tolist()  # unseen characters are <unk>
    assert 0 not in corpus.tokens("train").tolist()

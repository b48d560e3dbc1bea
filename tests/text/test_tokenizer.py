"""Tokenizers: exact round trips, save/load, fingerprints, the registry, training options, pickling,
and loading existing models (a sentencepiece .model, a Hugging Face tokenizer.json built here)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from llmkit.data.sources import stdlib_corpus
from llmkit.text.tokenizer import (
    CHAT_TOKENS,
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    add_special_tokens,
    load_pretrained_tokenizer,
    load_tokenizer,
    tokenizer_from_state,
    train_tokenizer,
)
from tests.data.helpers import byte_level_bpe_json

VOCAB = 400
SP_KINDS = ["bpe", "unigram"]

# code-like text: blank lines, indentation (spaces and a tab), runs of spaces, digits, non-ASCII
SAMPLE = (
    "def f(x):\n"
    "    return  x + 12345\n"
    "\n\n"
    "\tif x:\n"
    "        y = [1, 22, 333]   # three spaces\n"
    "  leading and trailing  \n"
    "ünïcødé 日本語 café 2024-01-31\n"
)


# a table of numbers: without split_digits, sentencepiece would learn multi-digit pieces from it
NUMBERS = "\n\n".join(f"row {i}: {i * 7919 % 100000} {i * 31} 2024\n    value = {i}.{i * 3}" for i in range(1000))


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [text for _, text in stdlib_corpus(max_bytes=200_000)] + [NUMBERS]


@pytest.fixture(scope="module")
def sp_tokenizers(corpus: list[str]) -> dict[str, SentencePieceTokenizer]:
    return {kind: train_tokenizer(kind, corpus, VOCAB) for kind in SP_KINDS}


# ---- char ----------------------------------------------------------------------------------------
def test_char_round_trip_and_vocabulary() -> None:
    text = "hello world\nsecond line\n"
    tok = train_tokenizer("char", [text], 0)
    assert isinstance(tok, CharTokenizer)
    assert tok.vocab_size == len(set(text)) + 1  # + <unk> at id 0
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert all(1 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    # distinct characters get distinct ids
    assert len({tok.encode(c)[0] for c in set(text)}) == len(set(text))


def test_char_trains_on_all_texts() -> None:
    tok = train_tokenizer("char", ["ab", "cd"], 0)
    assert tok.decode(tok.encode("dcba")) == "dcba"
    assert 0 not in tok.encode("abcd")


def test_char_unseen_characters_map_to_zero() -> None:
    tok = train_tokenizer("char", ["hello world"], 0)
    ids = tok.encode("hex!")
    assert ids[0] == tok.encode("h")[0] != 0
    assert ids[1] == tok.encode("e")[0] != 0
    assert ids[2:] == [0, 0]
    assert tok.decode(ids) == "he\ufffd\ufffd"


# ---- sentencepiece -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SP_KINDS)
def test_sentencepiece_round_trips_exactly(kind: str, sp_tokenizers: dict[str, SentencePieceTokenizer]) -> None:
    tok = sp_tokenizers[kind]
    assert isinstance(tok, SentencePieceTokenizer)
    assert 256 < tok.vocab_size <= VOCAB
    for text in [SAMPLE, "  two leading spaces", "\n\nstarts with newlines", "trailing spaces   ", "9" * 40]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text, text


@pytest.mark.parametrize("kind", SP_KINDS)
def test_sentencepiece_round_trips_unseen_source(kind: str, sp_tokenizers: dict[str, SentencePieceTokenizer]) -> None:
    # a standard-library module that was not in the 200 kB training text
    docs = dict(stdlib_corpus())
    text = docs["stdlib:textwrap.py"][:20_000]
    tok = sp_tokenizers[kind]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < 0.85 * len(text)  # it learned multi-character pieces


@pytest.mark.parametrize("kind", SP_KINDS)
def test_sentencepiece_special_pieces(kind: str, sp_tokenizers: dict[str, SentencePieceTokenizer]) -> None:
    tok = sp_tokenizers[kind]
    assert tok.eos_id == 2
    # "\n" is a piece of its own: never merged with its neighbours
    newline = tok.sp.piece_to_id("\n")
    assert newline != tok.sp.unk_id()
    assert tok.encode("\n") == [newline]
    assert tok.encode("pass\n\nreturn").count(newline) == 2
    # indentation is learned as whitespace-only pieces, not spelled out space by space
    assert len(tok.encode(" " * 8)) <= 3
    # digits are split: no piece holds two digits
    ids = tok.encode("row 12: 2024 1000 + 99")
    assert all(not tok.sp.is_byte(i) for i in ids)
    pieces = [tok.sp.id_to_piece(i) for i in ids]
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces), pieces


@pytest.mark.xfail(
    strict=True,
    reason="BUG: sentencepiece escapes spaces as U+2581; a literal U+2581 in the text decodes as a space",
)
@pytest.mark.parametrize("kind", SP_KINDS)
def test_sentencepiece_round_trips_lower_one_eighth_block(
    kind: str, sp_tokenizers: dict[str, SentencePieceTokenizer]
) -> None:
    text = "bar \u2581 chart"
    tok = sp_tokenizers[kind]
    assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_training_is_deterministic(corpus: list[str], sp_tokenizers) -> None:
    # the cache and resume checks rely on the same text giving the same vocabulary
    again = train_tokenizer("bpe", corpus, VOCAB)
    assert again.fingerprint == sp_tokenizers["bpe"].fingerprint
    assert again.encode(SAMPLE) == sp_tokenizers["bpe"].encode(SAMPLE)


# ---- save / load / fingerprint -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["char", *SP_KINDS])
def test_save_and_load_give_identical_tokenizer(kind: str, tmp_path, corpus, sp_tokenizers) -> None:
    tok = train_tokenizer("char", corpus, 0) if kind == "char" else sp_tokenizers[kind]
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is type(tok)
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.eos_id == tok.eos_id
    assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    assert loaded.decode(tok.encode(corpus[0])) == tok.decode(tok.encode(corpus[0]))
    # also through a str path
    assert load_tokenizer(str(tmp_path)).fingerprint == tok.fingerprint


def test_load_tokenizer_from_empty_directory_fails(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_char_fingerprint_depends_on_vocabulary() -> None:
    a = train_tokenizer("char", ["abc"], 0)
    assert train_tokenizer("char", ["cab", "a"], 0).fingerprint == a.fingerprint  # same character set
    assert train_tokenizer("char", ["abd"], 0).fingerprint != a.fingerprint


@pytest.mark.parametrize("kind", SP_KINDS)
def test_sentencepiece_fingerprint_depends_on_training_text(kind: str, corpus, sp_tokenizers) -> None:
    docs = dict(stdlib_corpus())
    other = [docs[name] for name in ("stdlib:argparse.py", "stdlib:textwrap.py", "stdlib:typing.py")]
    other_tok = train_tokenizer(kind, other, VOCAB)
    assert other_tok.fingerprint != sp_tokenizers[kind].fingerprint


def test_unknown_tokenizer_lists_valid_names() -> None:
    with pytest.raises(KeyError, match="nope") as info:
        train_tokenizer("nope", ["text"], 100)
    assert "bpe, char, unigram" in str(info.value)


def test_vocabulary_too_small_for_the_characters_gives_a_clear_error() -> None:
    text = "".join(chr(0x4E00 + i) for i in range(200)) * 3  # 200 distinct characters
    with pytest.raises(ValueError, match="raise data.vocab_size"):
        train_tokenizer("bpe", [text], 300)


# ---- special tokens and training options ---------------------------------------------------------
SMALL_VOCAB = 350


@pytest.fixture(scope="module")
def small_corpus() -> list[str]:
    return [text for _, text in stdlib_corpus(max_bytes=40_000)]


@pytest.fixture(scope="module")
def small_bpe(small_corpus: list[str]) -> SentencePieceTokenizer:
    return train_tokenizer("bpe", small_corpus, SMALL_VOCAB)


def test_default_special_ids(small_bpe: SentencePieceTokenizer) -> None:
    assert (small_bpe.sp.unk_id(), small_bpe.bos_id, small_bpe.eos_id, small_bpe.pad_id) == (0, 1, 2, 3)
    assert [small_bpe.sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    char = train_tokenizer("char", ["abc"], 0)
    assert (char.bos_id, char.eos_id, char.pad_id) == (None, None, None)


def test_explicit_defaults_keep_the_fingerprint(small_corpus, small_bpe) -> None:
    # configs that spell out the defaults must reuse caches and checkpoints made without them
    explicit = train_tokenizer(
        "bpe", small_corpus, SMALL_VOCAB, byte_fallback=True, special_tokens={"bos": "<s>", "eos": "</s>", "pad": "<pad>"},
        user_symbols=["\n"], character_coverage=0.9995,
    )
    assert explicit.fingerprint == small_bpe.fingerprint


def test_special_tokens_renamed_and_disabled(small_corpus) -> None:
    tok = train_tokenizer(
        "unigram", small_corpus, SMALL_VOCAB, special_tokens={"bos": None, "eos": "<|endoftext|>", "pad": None}
    )
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 1, None)
    assert tok.sp.id_to_piece(1) == "<|endoftext|>" and tok.sp.bos_id() == -1
    # eos separates documents and vanishes in decode, like the default one
    assert tok.decode(tok.encode("a = 1") + [tok.eos_id] + tok.encode("b")) == "a = 1b"
    with pytest.raises(ValueError, match="valid keys: unk, bos, eos, pad"):
        train_tokenizer("bpe", small_corpus, SMALL_VOCAB, special_tokens={"cls": "<cls>"})


def test_user_symbols_are_single_pieces(small_corpus) -> None:
    tok = train_tokenizer("bpe", small_corpus, SMALL_VOCAB, user_symbols=["<|im_start|>", "<|im_end|>"])
    start, end = (tok.sp.piece_to_id(p) for p in ("<|im_start|>", "<|im_end|>"))
    assert tok.encode("<|im_start|>") == [start] and tok.encode("<|im_end|>") == [end]
    assert tok.sp.piece_to_id("\n") not in (start, end, tok.sp.unk_id())  # "\n" is still a piece
    assert tok.decode(tok.encode("x<|im_end|>\n")) == "x<|im_end|>\n"


def test_chat_tokens_are_reserved_by_default(small_corpus, small_bpe) -> None:
    start, end = (small_bpe.token_to_id(t) for t in CHAT_TOKENS)
    assert (start, end) == (5, 6)  # after <unk> <s> </s> <pad> and "\n"
    assert small_bpe.encode("x<|im_end|>") == small_bpe.encode("x") + [end]
    assert small_bpe.token_to_id("<s>") == small_bpe.bos_id and small_bpe.token_to_id("<nope>") is None
    plain = train_tokenizer("bpe", small_corpus, SMALL_VOCAB, reserve_chat_tokens=False)
    assert all(plain.token_to_id(t) is None for t in CHAT_TOKENS) and plain.fingerprint != small_bpe.fingerprint
    assert plain.vocab_size == small_bpe.vocab_size  # two fewer merges instead


def test_without_byte_fallback_unseen_characters_are_unknown(small_corpus) -> None:
    # no 256 byte pieces needed: a vocabulary smaller than 256 trains
    tok = train_tokenizer("bpe", small_corpus, 200, byte_fallback=False, character_coverage=1.0)
    assert tok.vocab_size <= 200
    assert not any(tok.sp.is_byte(i) for i in range(tok.vocab_size))
    assert tok.sp.unk_id() in tok.encode("日本")
    with_fallback = train_tokenizer("bpe", small_corpus, SMALL_VOCAB)
    assert tok.sp.unk_id() not in with_fallback.encode("日本")


def test_options_are_ignored_by_char() -> None:
    tok = train_tokenizer("char", ["ab"], 0, byte_fallback=False, special_tokens={"bos": None})
    assert tok.fingerprint == train_tokenizer("char", ["ab"], 0).fingerprint


# ---- existing models: a Hugging Face tokenizer.json, a sentencepiece .model -----------------------
HF_TEXTS = ["the quick brown fox jumps over the lazy dog", "def f(x):\n    return x + 1\n", "ünïcødé café 日本語"] * 5


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory) -> Path:
    """A tiny byte-level BPE built with the tokenizers library (exact round trips, like GPT-2's)."""
    return byte_level_bpe_json(HF_TEXTS, 320, tmp_path_factory.mktemp("hf") / "tokenizer.json")


def test_hf_tokenizer_json_loads_and_round_trips(hf_json: Path) -> None:
    tok = load_pretrained_tokenizer(hf_json)
    assert isinstance(tok, HFTokenizer) and tok.kind == "hf_tokenizers"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == 320
    for text in [SAMPLE, *HF_TEXTS[:3], "unseen words 🙂"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.bos_id not in tok.encode("the fox")  # encode adds no special tokens
    assert tok.decode(tok.encode("a") + [tok.eos_id] + tok.encode("b")) == "ab"
    assert load_pretrained_tokenizer(hf_json.parent).fingerprint == tok.fingerprint  # the directory works too


def test_hf_tokenizer_save_load_state_and_fingerprint(hf_json: Path, tmp_path: Path) -> None:
    tok = load_pretrained_tokenizer(hf_json)
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llmkit_tokenizer.json", "tokenizer.json"]
    assert "model" in json.loads((tmp_path / "tokenizer.json").read_text())  # the HF file, not our meta
    for again in (load_tokenizer(tmp_path), tokenizer_from_state(tok.to_state()), load_pretrained_tokenizer(tmp_path)):
        assert isinstance(again, HFTokenizer)
        assert again.fingerprint == tok.fingerprint == load_pretrained_tokenizer(hf_json).fingerprint
        assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    state = tok.to_state()
    assert state == {"kind": "hf_tokenizers", "json": hf_json.read_text(encoding="utf-8")}
    # a bare HF tokenizer.json directory (no llmkit meta) loads as well
    (tmp_path / "llmkit_tokenizer.json").unlink()
    assert load_tokenizer(tmp_path).fingerprint == tok.fingerprint


def test_sentencepiece_model_file_loads(small_bpe: SentencePieceTokenizer, tmp_path: Path) -> None:
    model = tmp_path / "m.model"
    model.write_bytes(small_bpe.proto)
    tok = load_pretrained_tokenizer(model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.fingerprint == small_bpe.fingerprint and tok.encode(SAMPLE) == small_bpe.encode(SAMPLE)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "tokenizer.model").write_bytes(small_bpe.proto)  # e.g. a Llama checkpoint directory
    assert load_pretrained_tokenizer(tmp_path / "dir").fingerprint == small_bpe.fingerprint


def test_load_pretrained_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_pretrained_tokenizer(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_pretrained_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="expected a sentencepiece .model"):
        load_pretrained_tokenizer(tmp_path / "vocab.txt")


# ---- meta file: new name, old directories still load ---------------------------------------------
def test_new_saves_use_llmkit_tokenizer_json(small_bpe: SentencePieceTokenizer, tmp_path: Path) -> None:
    small_bpe.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llmkit_tokenizer.json", "tokenizer.model"]


def test_directories_from_older_llmkit_still_load(small_bpe: SentencePieceTokenizer, tmp_path: Path) -> None:
    old_char, old_sp = tmp_path / "char", tmp_path / "sp"
    old_char.mkdir()
    (old_char / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": "abc"}))
    assert load_tokenizer(old_char).fingerprint == CharTokenizer("abc").fingerprint
    old_sp.mkdir()
    (old_sp / "tokenizer.json").write_text(json.dumps({"kind": "sentencepiece"}))
    (old_sp / "tokenizer.model").write_bytes(small_bpe.proto)
    assert load_tokenizer(old_sp).fingerprint == small_bpe.fingerprint
    assert load_pretrained_tokenizer(old_sp).fingerprint == small_bpe.fingerprint  # not mistaken for an HF file


# ---- batch encoding and pickling (for worker processes) ------------------------------------------
@pytest.fixture(scope="module")
def every_kind(small_corpus, small_bpe, hf_json) -> dict:
    return {"char": train_tokenizer("char", small_corpus, 0), "bpe": small_bpe, "hf": load_pretrained_tokenizer(hf_json)}


@pytest.mark.parametrize("kind", ["char", "bpe", "hf"])
def test_encode_batch_matches_encode(kind: str, every_kind: dict) -> None:
    tok = every_kind[kind]
    texts = [SAMPLE, "", "x", *HF_TEXTS[:3]]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch([]) == []


@pytest.mark.parametrize("kind", ["char", "bpe", "hf"])
def test_tokenizers_pickle(kind: str, every_kind: dict) -> None:
    tok = every_kind[kind]
    again = pickle.loads(pickle.dumps(tok))
    assert type(again) is type(tok)
    assert again.fingerprint == tok.fingerprint and again.vocab_size == tok.vocab_size
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    assert again.decode(tok.encode(SAMPLE)) == tok.decode(tok.encode(SAMPLE))


# ---- adding special tokens to an existing vocabulary ---------------------------------------------
def test_add_special_tokens_to_a_char_tokenizer(tmp_path: Path) -> None:
    base = CharTokenizer("/<>abs")  # ids 1-6
    tok = add_special_tokens(base, ["<s>", "</s>", "<|im_start|>", "a"])  # "a" is already one token: skipped
    assert tok.specials == ("<s>", "</s>", "<|im_start|>") and tok.vocab_size == base.vocab_size + 3
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (7, 8, None) and tok.token_to_id("<|im_start|>") == 9
    assert tok.encode("ab</s>") == [4, 5, 2, 1, 6, 3]  # encode never produces a special: text is characters
    assert tok.decode([7, 4, 9, 8]) == "<s>a<|im_start|></s>"
    assert tok.fingerprint != base.fingerprint and CharTokenizer("/<>abs").fingerprint == base.fingerprint
    tok.save(tmp_path)
    for again in (load_tokenizer(tmp_path), tokenizer_from_state(tok.to_state()), pickle.loads(pickle.dumps(tok))):
        assert again.specials == tok.specials and again.fingerprint == tok.fingerprint
    assert base.to_state() == {"kind": "char", "chars": "/<>abs"}  # no specials: the state (and checkpoints) as before
    assert add_special_tokens(tok, ["<s>"]) is tok


def test_add_special_tokens_to_sentencepiece(small_corpus) -> None:
    plain = train_tokenizer("bpe", small_corpus, SMALL_VOCAB, reserve_chat_tokens=False)
    tok = add_special_tokens(plain, CHAT_TOKENS)
    start, end = plain.vocab_size, plain.vocab_size + 1  # appended: every old id keeps its meaning
    assert tok.vocab_size == plain.vocab_size + 2 and [tok.token_to_id(t) for t in CHAT_TOKENS] == [start, end]
    assert tok.encode(SAMPLE) == plain.encode(SAMPLE)
    assert tok.encode("x<|im_start|>y") == tok.encode("x") + [start] + tok.encode("y")
    assert tok.decode(tok.encode("x<|im_start|>y")) == "x<|im_start|>y"


def test_add_special_tokens_to_an_hf_tokenizer(hf_json: Path) -> None:
    base = load_pretrained_tokenizer(hf_json)
    tok = add_special_tokens(base, CHAT_TOKENS)
    assert [tok.token_to_id(t) for t in CHAT_TOKENS] == [base.vocab_size, base.vocab_size + 1]
    assert tok.vocab_size == base.vocab_size + 2 and tok.encode(SAMPLE) == base.encode(SAMPLE)

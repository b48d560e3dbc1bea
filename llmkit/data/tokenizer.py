"""Tokenizers: char-level and sentencepiece (BPE or unigram), trained on the training text.

A tokenizer saves itself into a directory and is loaded back from there, so it travels with the
tokenized data and with every checkpoint. `fingerprint` identifies its exact vocabulary.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import sentencepiece as spm

from llmkit.registry import Registry


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: Path) -> None: ...

    def to_state(self) -> dict: ...

    @property
    def fingerprint(self) -> str: ...


# name -> trainer(texts, vocab_size) -> Tokenizer
TOKENIZERS: Registry["Tokenizer"] = Registry("tokenizer")
_META = "tokenizer.json"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class CharTokenizer:
    """One id per character seen in training; unseen characters map to id 0 (<unk>)."""

    kind = "char"
    eos_id = None

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.vocab_size = len(chars) + 1
        self._ids = {c: i + 1 for i, c in enumerate(chars)}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None) -> "CharTokenizer":
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, 0) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i - 1] if 0 < i <= len(self.chars) else "\ufffd" for i in ids)

    def save(self, directory: Path) -> None:
        (directory / _META).write_text(json.dumps({"kind": self.kind, "chars": self.chars}))

    @classmethod
    def load(cls, directory: Path) -> "CharTokenizer":
        return cls(json.loads((directory / _META).read_text())["chars"])

    def to_state(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    @property
    def fingerprint(self) -> str:
        return _sha(self.chars.encode())


class SentencePieceTokenizer:
    """sentencepiece model with byte fallback, no text normalisation (code keeps its whitespace).

    Known limit: sentencepiece uses U+2581 (▁) as its space symbol, so a literal ▁ in the text
    decodes as a space."""

    kind = "sentencepiece"
    model_file = "tokenizer.model"

    def __init__(self, proto: bytes) -> None:
        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "bpe") -> "SentencePieceTokenizer":
        # sentencepiece trains on "sentences": feed paragraphs, and make "\n" a piece of its own
        # so that code and verse keep their line structure.
        paragraphs = (p for text in texts for p in text.split("\n\n") if p.strip())
        buffer = io.BytesIO()
        try:
            cls._train(paragraphs, buffer, vocab_size, model_type)
        except RuntimeError as err:  # sentencepiece's own message is terse; say what to change
            raise ValueError(
                f"sentencepiece could not train a {model_type} tokenizer of {vocab_size} pieces: {err}. "
                "With byte fallback the vocabulary needs 256 byte pieces + 4 specials + the distinct characters "
                "of the text: raise data.vocab_size, or use data.tokenizer=char"
            ) from err
        return cls(buffer.getvalue())

    @staticmethod
    def _train(paragraphs: Iterable[str], buffer: io.BytesIO, vocab_size: int, model_type: str) -> None:
        spm.SentencePieceTrainer.train(
            sentence_iterator=paragraphs, model_writer=buffer, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, user_defined_symbols=["\n"],
            split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
            input_sentence_size=500_000, shuffle_input_sentence=True, num_threads=2, minloglevel=2,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False,
        )

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def save(self, directory: Path) -> None:
        (directory / self.model_file).write_bytes(self.proto)
        (directory / _META).write_text(json.dumps({"kind": self.kind}))

    @classmethod
    def load(cls, directory: Path) -> "SentencePieceTokenizer":
        return cls((directory / cls.model_file).read_bytes())

    def to_state(self) -> dict:
        return {"kind": self.kind, "model": self.proto}

    @property
    def fingerprint(self) -> str:
        return _sha(self.proto)


@TOKENIZERS.register("char")
def train_char(texts: Iterable[str], vocab_size: int | None = None) -> CharTokenizer:
    return CharTokenizer.train(texts)


@TOKENIZERS.register("bpe")
def train_bpe(texts: Iterable[str], vocab_size: int) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.train(texts, vocab_size, "bpe")


@TOKENIZERS.register("unigram")
def train_unigram(texts: Iterable[str], vocab_size: int) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.train(texts, vocab_size, "unigram")


def train_tokenizer(kind: str, texts: list[str], vocab_size: int) -> Tokenizer:
    return TOKENIZERS.build(kind, texts=texts, vocab_size=vocab_size)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    directory = Path(directory)
    meta_file = directory / _META
    if not meta_file.exists():
        raise FileNotFoundError(f"no tokenizer in {directory} (expected {_META})")
    kind = json.loads(meta_file.read_text())["kind"]
    loaders = {"char": CharTokenizer, "sentencepiece": SentencePieceTokenizer}
    return loaders[kind].load(directory)


def tokenizer_from_state(state: dict) -> Tokenizer:
    """Rebuild a tokenizer from `to_state()`, as stored in checkpoints (plain str/bytes: weights_only-safe)."""
    if state["kind"] == "char":
        return CharTokenizer(state["chars"])
    if state["kind"] == "sentencepiece":
        return SentencePieceTokenizer(state["model"])
    raise ValueError(f"unknown tokenizer kind '{state['kind']}' in checkpoint")

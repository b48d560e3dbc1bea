"""Tokenizers: char-level and sentencepiece (BPE or unigram) trained on the training text, or an
existing model loaded as it is (a sentencepiece `.model`, a Hugging Face `tokenizer.json`).

A tokenizer saves itself into a directory and is loaded back from there, so it travels with the
tokenized data and with every checkpoint. `fingerprint` identifies its exact vocabulary. Every
tokenizer pickles (its state is the model file's bytes), so it can go to worker processes.

Files in a tokenizer directory: `llmkit_tokenizer.json` (which kind; the characters of a char
tokenizer), plus the model: `tokenizer.model` (sentencepiece) or `tokenizer.json` (HF tokenizers).
Directories written before the HF kind existed keep that meta file as `tokenizer.json` (it has a
"kind" key); `load_tokenizer` still reads them.

Special tokens for chat (llmkit/text/chat.py): a sentencepiece tokenizer trained here reserves
`CHAT_TOKENS` ("<|im_start|>", "<|im_end|>") as pieces of their own unless `reserve_chat_tokens=False`.
An existing vocabulary gains them only through an explicit `add_special_tokens`, which appends new
ids past the old vocabulary: the model's embedding (and an untied output head) must then grow to the
new `vocab_size`. `token_to_id` finds a token that is one entry of the vocabulary, so templates
render special tokens by id rather than by encoding their text.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import sentencepiece as spm

from llmkit.registry import Registry

if TYPE_CHECKING:
    import tokenizers


class Tokenizer(Protocol):
    kind: str
    vocab_size: int

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int | None: ...

    @property
    def pad_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def save(self, directory: Path) -> None: ...

    def to_state(self) -> dict: ...

    @property
    def fingerprint(self) -> str: ...


# name -> trainer(texts, vocab_size, **options) -> Tokenizer
TOKENIZERS: Registry["Tokenizer"] = Registry("tokenizer")
_META = "llmkit_tokenizer.json"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # chatml's turn delimiters, reserved by default when training
_HF_FILE = "tokenizer.json"  # the HF tokenizers file; also our meta file's name before the HF kind existed


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _write_meta(directory: Path, meta: dict) -> None:
    (directory / _META).write_text(json.dumps(meta))


def _read_meta(directory: Path) -> dict:
    """The meta dict: from `llmkit_tokenizer.json`, else an old-style `tokenizer.json` (it has "kind"),
    else a bare HF `tokenizer.json` (no "kind": an HF tokenizers file dropped into the directory)."""
    meta_file, hf_file = directory / _META, directory / _HF_FILE
    if meta_file.exists():
        return json.loads(meta_file.read_text())
    if hf_file.exists():
        data = json.loads(hf_file.read_text())
        return data if isinstance(data, dict) and "kind" in data else {"kind": HFTokenizer.kind}
    raise FileNotFoundError(f"no tokenizer in {directory} (expected {_META}, or {_HF_FILE} from an older llmkit)")


class CharTokenizer:
    """One id per character seen in training; unseen characters map to id 0 (<unk>).

    No special tokens unless added (`add_special_tokens`): they take the ids after the characters,
    `encode` never produces them (it reads text one character at a time, so a user's "</s>" stays
    four characters), and "<s>" / "</s>" / "<pad>", when added, are the BOS / EOS / PAD."""

    kind = "char"

    def __init__(self, chars: str, specials: Iterable[str] = ()) -> None:
        self.chars = chars
        self.specials = tuple(specials)
        self.vocab_size = len(chars) + 1 + len(self.specials)
        self._ids = {c: i + 1 for i, c in enumerate(chars)}
        self._special_ids = {t: len(chars) + 1 + i for i, t in enumerate(self.specials)}

    @property
    def bos_id(self) -> int | None:
        return self._special_ids.get("<s>")

    @property
    def eos_id(self) -> int | None:
        return self._special_ids.get("</s>")

    @property
    def pad_id(self) -> int | None:
        return self._special_ids.get("<pad>")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None) -> "CharTokenizer":
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, 0) for c in text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self._piece(i) for i in ids)

    def _piece(self, i: int) -> str:
        if 0 < i <= len(self.chars):
            return self.chars[i - 1]
        special = i - len(self.chars) - 1
        return self.specials[special] if 0 <= special < len(self.specials) else "\ufffd"

    def token_to_id(self, token: str) -> int | None:
        """A special token's id, or a single character's (the only other one-token strings)."""
        return self._special_ids.get(token, self._ids.get(token))

    def save(self, directory: Path) -> None:
        _write_meta(directory, self.to_state())

    @classmethod
    def load(cls, directory: Path) -> "CharTokenizer":
        meta = _read_meta(directory)
        return cls(meta["chars"], meta.get("specials", ()))

    def to_state(self) -> dict:
        # "specials" only when there are some: older states and fingerprints stay as they were
        state: dict[str, Any] = {"kind": self.kind, "chars": self.chars}
        return state | ({"specials": list(self.specials)} if self.specials else {})

    @property
    def fingerprint(self) -> str:
        extra = "".join(f"\0{t}" for t in self.specials)  # NUL: no character of a vocabulary
        return _sha((self.chars + extra).encode())


# sentencepiece's own default pieces; ids are given in this order after <unk> = 0
_SP_SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}


def _special_token_args(special_tokens: Mapping[str, str | None] | None) -> dict[str, Any]:
    """sentencepiece trainer arguments for <unk> (always id 0) and BOS/EOS/PAD.

    A missing key keeps the default piece, a null value disables that token (sentencepiece id -1);
    enabled ones get ids 1, 2, ... in the order bos, eos, pad. A piece equal to sentencepiece's
    default is not passed: that keeps the trainer spec, hence the model bytes and the fingerprint,
    identical to tokenizers trained before these options existed."""
    tokens = dict(special_tokens or {})
    unknown = set(tokens) - {"unk", *_SP_SPECIALS}
    if unknown:
        raise ValueError(f"special_tokens: unknown {sorted(unknown)}; valid keys: unk, bos, eos, pad")
    args: dict[str, Any] = {"unk_id": 0}
    if tokens.get("unk") not in (None, "<unk>"):
        args["unk_piece"] = tokens["unk"]
    next_id = 1
    for name, default in _SP_SPECIALS.items():
        piece = tokens.get(name, default)
        args[f"{name}_id"] = next_id if piece is not None else -1
        next_id += piece is not None
        if piece not in (None, default):
            args[f"{name}_piece"] = piece
    return args


class SentencePieceTokenizer:
    """sentencepiece model; when trained here: byte fallback, no text normalisation (code keeps its
    whitespace), "\\n" a piece of its own, digits split.

    Known limit: sentencepiece uses U+2581 (▁) as its space symbol, so a literal ▁ in the text
    decodes as a space."""

    kind = "sentencepiece"
    model_file = "tokenizer.model"

    def __init__(self, proto: bytes) -> None:
        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self.sp.get_piece_size()

    # the processor is a C++ object: pickle the model bytes and rebuild it
    def __getstate__(self) -> dict:
        return {"proto": self.proto}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"])

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        model_type: str = "bpe",
        byte_fallback: bool = True,
        special_tokens: Mapping[str, str | None] | None = None,
        user_symbols: Iterable[str] | None = None,
        character_coverage: float = 0.9995,
        reserve_chat_tokens: bool = True,
    ) -> "SentencePieceTokenizer":
        """Train on `texts`. `special_tokens` maps bos/eos/pad (and unk) to a piece, null = none;
        `user_symbols` are extra pieces never split, after "\\n" and (unless `reserve_chat_tokens`
        is false) CHAT_TOKENS, which chat templates need as single tokens.

        sentencepiece matches such pieces in any text it encodes, so "<|im_start|>" in training
        text becomes that one id: llmkit/text/chat.py renders them by id and keeps a user's
        typed copy from turning into the token."""
        specials = _special_token_args(special_tokens)
        chat = CHAT_TOKENS if reserve_chat_tokens else ()
        symbols = list(dict.fromkeys(["\n", *chat, *(user_symbols or [])]))  # "\n" first, as before, no duplicates
        options = dict(
            model_type=model_type, byte_fallback=byte_fallback, character_coverage=character_coverage,
            user_defined_symbols=symbols, **specials,
        )
        # sentencepiece trains on "sentences": feed paragraphs, and make "\n" a piece of its own
        # so that code and verse keep their line structure.
        paragraphs = (p for text in texts for p in text.split("\n\n") if p.strip())
        buffer = io.BytesIO()
        try:
            cls._train(paragraphs, buffer, vocab_size, options)
        except RuntimeError as err:  # sentencepiece's own message is terse; say what to change
            n_special = 1 + sum(specials[f"{name}_id"] >= 0 for name in _SP_SPECIALS) + len(symbols)
            need = f"256 byte pieces + {n_special} specials" if byte_fallback else f"{n_special} specials"
            raise ValueError(
                f"sentencepiece could not train a {model_type} tokenizer of {vocab_size} pieces: {err}. "
                f"The vocabulary needs {need} + the distinct characters of the text: raise data.vocab_size, "
                "or use data.tokenizer=char"
            ) from err
        return cls(buffer.getvalue())

    @staticmethod
    def _train(paragraphs: Iterable[str], buffer: io.BytesIO, vocab_size: int, options: dict[str, Any]) -> None:
        spm.SentencePieceTrainer.train(
            sentence_iterator=paragraphs, model_writer=buffer, vocab_size=vocab_size,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
            input_sentence_size=500_000, shuffle_input_sentence=True, num_threads=2, minloglevel=2,
            hard_vocab_limit=False, **options,
        )

    @property
    def bos_id(self) -> int | None:
        return _none_if_negative(self.sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return _none_if_negative(self.sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        return _none_if_negative(self.sp.pad_id())

    encode_threads = -1  # encode_batch's threads; -1: every core. Encoding worker processes set 1.

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # one call: sentencepiece encodes a list on its own threads (all cores unless encode_threads is set)
        return self.sp.encode(list(texts), num_threads=self.encode_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)  # an unknown piece gives <unk>'s id: check it round trips
        return token_id if self.sp.id_to_piece(token_id) == token else None

    def save(self, directory: Path) -> None:
        (directory / self.model_file).write_bytes(self.proto)
        _write_meta(directory, {"kind": self.kind})

    @classmethod
    def load(cls, directory: Path) -> "SentencePieceTokenizer":
        return cls((directory / cls.model_file).read_bytes())

    def to_state(self) -> dict:
        return {"kind": self.kind, "model": self.proto}

    @property
    def fingerprint(self) -> str:
        return _sha(self.proto)


def _none_if_negative(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None  # sentencepiece: -1 = this special is disabled


class HFTokenizer:
    """A Hugging Face `tokenizers` model (a `tokenizer.json`), used as it is.

    `encode` adds no special tokens (document separators are the data pipeline's job). The
    bos/eos/pad ids are found by token string, the first of each list that is in the vocabulary:
    bos "<s>", "<bos>", "<|begin_of_text|>", "<|endoftext|>"; eos "</s>", "<eos>", "<|end_of_text|>",
    "<|endoftext|>"; pad "<pad>", "<|pad|>", "[PAD]". None when none of them is there."""

    kind = "hf_tokenizers"
    model_file = _HF_FILE
    SPECIAL_CANDIDATES = {
        "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|endoftext|>"),
        "eos": ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>"),
        "pad": ("<pad>", "<|pad|>", "[PAD]"),
    }

    def __init__(self, json_str: str) -> None:
        try:
            from tokenizers import Tokenizer as _HFTokenizer  # lazily: only this kind needs the library
        except ImportError as err:
            raise ImportError("a tokenizer.json model needs the Hugging Face tokenizers library: pip install tokenizers") from err
        self.json = json_str
        self.tok = _HFTokenizer.from_str(json_str)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = (self._find(name) for name in ("bos", "eos", "pad"))

    @classmethod
    def from_tokenizers(cls, tok: "tokenizers.Tokenizer") -> "HFTokenizer":
        return cls(tok.to_str())

    def _find(self, name: str) -> int | None:
        ids = (self.tok.token_to_id(token) for token in self.SPECIAL_CANDIDATES[name])
        return next((i for i in ids if i is not None), None)

    def __getstate__(self) -> dict:
        return {"json": self.json}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["json"])

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def save(self, directory: Path) -> None:
        (directory / self.model_file).write_text(self.json, encoding="utf-8")
        _write_meta(directory, {"kind": self.kind})

    @classmethod
    def load(cls, directory: Path) -> "HFTokenizer":
        return cls((directory / cls.model_file).read_text(encoding="utf-8"))

    def to_state(self) -> dict:
        return {"kind": self.kind, "json": self.json}

    @property
    def fingerprint(self) -> str:
        return _sha(self.json.encode("utf-8"))


# ---- training: the registry ----------------------------------------------------------------------
@TOKENIZERS.register("char")
def train_char(texts: Iterable[str], vocab_size: int | None = None, **options: Any) -> CharTokenizer:
    # options are for the sentencepiece kinds (a data config passes one set for every kind)
    return CharTokenizer.train(texts)


@TOKENIZERS.register("bpe")
def train_bpe(texts: Iterable[str], vocab_size: int, **options: Any) -> SentencePieceTokenizer:
    """options: byte_fallback, special_tokens, user_symbols, character_coverage, reserve_chat_tokens."""
    return SentencePieceTokenizer.train(texts, vocab_size, "bpe", **options)


@TOKENIZERS.register("unigram")
def train_unigram(texts: Iterable[str], vocab_size: int, **options: Any) -> SentencePieceTokenizer:
    """options: byte_fallback, special_tokens, user_symbols, character_coverage, reserve_chat_tokens."""
    return SentencePieceTokenizer.train(texts, vocab_size, "unigram", **options)


def train_tokenizer(kind: str, texts: list[str], vocab_size: int, **options: Any) -> Tokenizer:
    return TOKENIZERS.build(kind, texts=texts, vocab_size=vocab_size, **options)


# ---- loading -------------------------------------------------------------------------------------
_LOADERS: dict[str, Any] = {
    cls.kind: cls for cls in (CharTokenizer, SentencePieceTokenizer, HFTokenizer)
}


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """A tokenizer saved by `save` (or an older llmkit) into `directory`."""
    directory = Path(directory)
    kind = _read_meta(directory)["kind"]
    if kind not in _LOADERS:
        raise ValueError(f"unknown tokenizer kind '{kind}' in {directory}")
    return _LOADERS[kind].load(directory)


def load_pretrained_tokenizer(path: str | Path) -> Tokenizer:
    """An existing tokenizer model, used instead of training one: a sentencepiece `.model` file, a
    Hugging Face `tokenizer.json` file, or a directory holding either (tokenizer.json preferred)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / _META).is_file() or (path / _HF_FILE).is_file():
            return load_tokenizer(path)  # also tells an HF tokenizer.json from an old llmkit meta file
        if (path / SentencePieceTokenizer.model_file).is_file():
            return SentencePieceTokenizer((path / SentencePieceTokenizer.model_file).read_bytes())
        raise FileNotFoundError(f"no {_HF_FILE} or {SentencePieceTokenizer.model_file} in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer model at {path}")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path.read_bytes())
    if path.suffix == ".json":
        return HFTokenizer(path.read_text(encoding="utf-8"))
    raise ValueError(f"{path}: expected a sentencepiece .model or a Hugging Face tokenizer.json")


def tokenizer_from_state(state: dict) -> Tokenizer:
    """Rebuild a tokenizer from `to_state()`, as stored in checkpoints (plain str/bytes: weights_only-safe)."""
    if state["kind"] == "char":
        return CharTokenizer(state["chars"], state.get("specials", ()))
    if state["kind"] == "sentencepiece":
        return SentencePieceTokenizer(state["model"])
    if state["kind"] == HFTokenizer.kind:
        return HFTokenizer(state["json"])
    raise ValueError(f"unknown tokenizer kind '{state['kind']}' in checkpoint")


# ---- adding special tokens to an existing vocabulary ---------------------------------------------
def add_special_tokens(tokenizer: Tokenizer, tokens: Iterable[str]) -> Tokenizer:
    """A new tokenizer: `tokenizer` plus each of `tokens` that is not already one token of it, as
    special tokens with new ids after the old vocabulary (old ids keep their meaning).

    Explicit by design: the result has a larger `vocab_size`, so a model trained with the old one
    needs its embedding (and an untied output head) resized before it can take the new ids.
    sentencepiece needs the protobuf package to edit its model; HF tokenizers the tokenizers one."""
    new = [t for t in dict.fromkeys(tokens) if tokenizer.token_to_id(t) is None]
    if not new:
        return tokenizer
    if isinstance(tokenizer, CharTokenizer):
        return CharTokenizer(tokenizer.chars, (*tokenizer.specials, *new))
    if isinstance(tokenizer, SentencePieceTokenizer):
        return SentencePieceTokenizer(_sentencepiece_with(tokenizer.proto, new))
    if isinstance(tokenizer, HFTokenizer):
        import tokenizers as hf

        tok = hf.Tokenizer.from_str(tokenizer.json)
        tok.add_special_tokens([hf.AddedToken(t, special=True, normalized=False) for t in new])
        return HFTokenizer(tok.to_str())
    raise TypeError(f"add_special_tokens: no support for {type(tokenizer).__name__}")


def _sentencepiece_with(proto: bytes, tokens: list[str]) -> bytes:
    """The model with `tokens` appended as USER_DEFINED pieces: kept whole, ids after the old ones."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError as err:  # the generated module needs protobuf, which sentencepiece does not require
        raise ImportError("adding tokens to a sentencepiece model needs protobuf: pip install protobuf") from err
    model = model_pb2.ModelProto()
    model.ParseFromString(proto)
    for token in tokens:
        model.pieces.add(piece=token, score=0.0, type=model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    return model.SerializeToString()

"""Shared test fixtures' building blocks for the data tests."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest


def byte_level_bpe_json(texts: Iterable[str], vocab_size: int, path: Path) -> Path:
    """A tiny byte-level BPE (exact round trips, like GPT-2's) with <s>, </s>, <pad>, trained with the
    Hugging Face tokenizers library and saved as tokenizer.json at `path`; skips without the library."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.save(str(path))
    return path

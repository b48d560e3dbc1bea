"""LightningDataModule: documents -> tokenizer -> cached token arrays -> batches.

`prepare_data` (one process per node) reads the source, trains the tokenizer on the training
split and caches the tokenized corpus under `cache_dir`, keyed by a fingerprint of the text and
every setting, so later runs reuse it. `setup` memory-maps the cache. The data position travels
in checkpoints (`state_dict`), as does the tokenizer's fingerprint, so a resume with other data
fails loudly instead of training on a different vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from llmkit.data.datasets import RandomWindowBatches, ResumableBatchSampler, SequentialWindows
from llmkit.data.sources import SOURCES, Document
from llmkit.data.tokenized import TokenizedCorpus, build_tokenized
from llmkit.data.tokenizer import Tokenizer


class LMDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: str = "stdlib",
        path: str | list[str] | None = None,
        max_bytes: int | None = None,
        tokenizer: str = "bpe",
        vocab_size: int = 2048,
        split: str = "hash",
        val_fraction: float = 0.1,
        seq_len: int = 128,
        batch_size: int = 16,
        val_windows: int = 256,
        num_workers: int = 0,
        cache_dir: str = "data_cache",
        seed: int = 1337,
    ) -> None:
        super().__init__()
        self.source, self.path, self.max_bytes = source, path, max_bytes
        self.tokenizer_kind, self.vocab_size_request = tokenizer, vocab_size
        self.split, self.val_fraction = split, val_fraction
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_windows, self.num_workers = val_windows, num_workers
        self.cache_dir, self.seed = Path(cache_dir), seed
        self.corpus: TokenizedCorpus | None = None
        self.train_sampler: ResumableBatchSampler | None = None
        self._resume_batches = 0

    # ---- preparation -------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return {
            "source": self.source, "path": self.path, "max_bytes": self.max_bytes, "tokenizer": self.tokenizer_kind,
            "vocab_size": self.vocab_size_request, "split": self.split, "val_fraction": self.val_fraction,
        }

    def _documents(self) -> list[Document]:
        return SOURCES.build(self.source, path=self.path, max_bytes=self.max_bytes)

    def corpus_dir(self, docs: list[Document]) -> Path:
        digest = hashlib.sha256(json.dumps(self._settings(), sort_keys=True).encode())
        for name, text in docs:
            digest.update(name.encode())
            digest.update(text.encode("utf-8", errors="replace"))
        return self.cache_dir / f"{self.source}-{self.tokenizer_kind}-{digest.hexdigest()[:12]}"

    def prepare_data(self) -> None:
        docs = self._documents()
        out_dir = self.corpus_dir(docs)
        if not (out_dir / "meta.json").exists():
            build_tokenized(
                docs, out_dir, self.tokenizer_kind, self.vocab_size_request, self.split, self.val_fraction,
                self._settings(),
            )
        self._corpus_dir = out_dir

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is not None:
            return
        out_dir = getattr(self, "_corpus_dir", None) or self.corpus_dir(self._documents())
        self.corpus = TokenizedCorpus.load(out_dir)

    # ---- what the model needs to know ------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        self.setup()
        return self.corpus.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # ---- loaders ---------------------------------------------------------------------------------
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, _ = self._rank_and_world()
        tokens = self.corpus.tokens("train")
        dataset = RandomWindowBatches(tokens, self.seq_len, self.batch_size, self.seed, rank)
        self.train_sampler = ResumableBatchSampler(start=self._resume_batches)
        return DataLoader(
            dataset, batch_size=None, sampler=self.train_sampler, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        rank, world = self._rank_and_world()
        dataset = SequentialWindows(self.corpus.tokens("val"), self.seq_len, self.val_windows, rank, world)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    # ---- checkpoint state ------------------------------------------------------------------------
    def batches_consumed(self) -> int:
        """Training batches this rank has consumed; checkpoints are written at optimizer steps."""
        trainer = self.trainer
        return trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0

    def state_dict(self) -> dict[str, Any]:
        self.setup()
        return {
            "batches_consumed": self.batches_consumed(), "tokenizer_fingerprint": self.corpus.tokenizer.fingerprint,
            "vocab_size": self.vocab_size, "corpus": self.corpus.directory.name,
            "tokenizer": self.corpus.tokenizer.to_state(),  # the checkpoint alone can decode its samples
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.setup()
        mine = self.corpus.tokenizer.fingerprint
        if state.get("tokenizer_fingerprint") != mine:
            raise ValueError(
                f"the checkpoint was trained with another tokenizer (corpus {state.get('corpus')}, vocab "
                f"{state.get('vocab_size')}) than this run's data (corpus {self.corpus.directory.name}, vocab "
                f"{self.vocab_size}); resume with the data settings the checkpoint was trained with"
            )
        self._resume_batches = int(state["batches_consumed"])

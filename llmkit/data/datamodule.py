"""LightningDataModule: raw documents -> prepared token shards -> batches that resume exactly.

`prepare_data` (one process per node) runs the pipeline (llmkit/data/prep/pipeline.py) unless the
dataset for these settings is already under `cache_dir`, or fetches a prepared dataset from a
path or fsspec URL (`prepared=`). `setup` opens it: the manifest, the tokenizer and (by default)
every shard's checksum. Training batches are addressed by a global sample index
(llmkit/data/streaming.py), so the data position saved in a checkpoint is one number, restored
exactly mid-epoch and under another number of ranks; the data and tokenizer fingerprints travel
with it, and a resume on other data fails loudly instead of training on something else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader

from llmkit.data.prep.pipeline import DataSpec, dataset_dir, prepare
from llmkit.data.prepared import PreparedDataset
from llmkit.data.remote import cache_path, is_remote, localize
from llmkit.data.shards import ShardError
from llmkit.data.streaming import (
    EndlessBatchIndices,
    Mixture,
    PackedSequences,
    RandomWindows,
    TrainBatches,
    ValidationWindows,
    samples_consumed,
)
from llmkit.text.tokenizer import Tokenizer

SAMPLINGS = ("epoch", "random")


class LMDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: str = "stdlib",
        path: str | list[str] | None = None,
        max_bytes: int | None = None,
        source_options: dict[str, Any] | None = None,
        mixture: dict[str, dict[str, Any]] | None = None,
        name: str | None = None,
        clean: dict[str, Any] | None = None,
        split: str = "hash",
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        split_key: str = "name",
        tokenizer: str = "bpe",
        vocab_size: int = 2048,
        tokenizer_options: dict[str, Any] | None = None,
        tokenizer_path: str | None = None,
        dtype: str = "auto",
        shard_tokens: int = 1 << 24,
        encode_processes: int = 1,
        prepared: str | None = None,
        verify: str = "checksum",
        sampling: str = "epoch",
        shuffle: bool = True,
        document_mask: bool = False,
        seq_len: int = 128,
        batch_size: int = 16,
        val_windows: int = 256,
        num_workers: int = 0,
        cache_dir: str = "data_cache",
        seed: int = 1337,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if sampling not in SAMPLINGS:
            raise ValueError(f"unknown data.sampling '{sampling}'; valid: {', '.join(SAMPLINGS)}")
        # Hydra hands nested config values over as DictConfig/ListConfig; the spec is plain data (it is
        # written into the manifest as JSON and fingerprinted).
        path, source_options, mixture, clean, tokenizer_options = map(
            _plain, (path, source_options, mixture, clean, tokenizer_options)
        )
        self.label = name or (source if not mixture else "mixture")
        self.spec = DataSpec(
            components=_components(self.label, source, path, max_bytes, source_options, mixture), clean=dict(clean or {}),
            split=split, val_fraction=val_fraction, test_fraction=test_fraction, split_key=split_key,
            tokenizer=tokenizer, vocab_size=vocab_size, tokenizer_options=dict(tokenizer_options or {}),
            tokenizer_path=tokenizer_path, dtype=dtype, shard_tokens=shard_tokens,
        )
        self.prepared, self.verify, self.encode_processes, self.progress = prepared, verify, encode_processes, progress
        self.sampling, self.shuffle, self.document_mask = sampling, shuffle, document_mask
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_windows, self.num_workers = val_windows, num_workers
        self.cache_dir, self.seed = Path(cache_dir), seed
        self.dataset: PreparedDataset | None = None
        self._data_dir: Path | None = None
        self._start_sample, self._start_step = 0, 0

    # ---- preparation -------------------------------------------------------------------------
    def data_dir(self) -> Path:
        """Where this run's prepared dataset is (or will be) on this machine; computed once, since the
        fingerprint behind it stats every source file."""
        if self._data_dir is None:
            if self.prepared is None:
                self._data_dir = dataset_dir(self.spec, self.cache_dir, self.label)
            elif is_remote(self.prepared):
                self._data_dir = cache_path(self.prepared, self.cache_dir)
            else:
                self._data_dir = Path(self.prepared.removeprefix("file://")).expanduser()
        return self._data_dir

    def prepare_data(self) -> None:
        if self.prepared is None:
            prepare(self.spec, self.cache_dir, self.label, self.encode_processes, self.progress, out=self.data_dir())
        elif is_remote(self.prepared):
            localize(self.prepared, self.cache_dir)
        self.dataset = self._open()  # shards are hashed once here (and stamped), so the other ranks need not

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:  # every rank; on the one that ran prepare_data it is already open
            self.dataset = self._open()

    def _open(self) -> PreparedDataset:
        dataset = PreparedDataset.open(self.data_dir(), self.verify)
        if self.prepared is not None and self.spec.tokenizer_path:
            _check_tokenizer(dataset, self.spec.tokenizer_path)
        return dataset

    # ---- what the model needs to know ------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        self.setup()
        return self.dataset.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # ---- loaders ---------------------------------------------------------------------------------
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_batches(self, rank: int = 0, world_size: int = 1) -> TrainBatches:
        self.setup()
        components = [self._sequences(c, index) for index, c in enumerate(self.dataset.components)]
        mixture = Mixture(self.dataset.weights, self.seed)
        return TrainBatches(components, mixture, self.batch_size, rank, world_size, self._start_sample, self.document_mask)

    def _sequences(self, component: str, index: int) -> PackedSequences | RandomWindows:
        stream = self.dataset.stream(component, "train")
        seed = self.seed + 1_000_003 * index  # components draw independent orders
        if self.sampling == "random":
            return RandomWindows(stream, self.seq_len, seed)
        return PackedSequences(stream, self.seq_len, seed, self.shuffle)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        return DataLoader(
            self.train_batches(rank, world), batch_size=None, sampler=EndlessBatchIndices(),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def validation_windows(self, rank: int = 0, world_size: int = 1, split: str = "val") -> ValidationWindows:
        self.setup()
        streams = [self.dataset.stream(c, split) for c in self.dataset.components]
        return ValidationWindows(
            streams, self.dataset.weights, self.seq_len, self.val_windows, rank, world_size, self.document_mask
        )

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        dataset = self.validation_windows(rank, world)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    # ---- checkpoint state ------------------------------------------------------------------------
    def samples_consumed(self) -> int:
        return samples_consumed(self.trainer, self.batch_size, self._start_sample, self._start_step)

    def state_dict(self) -> dict[str, Any]:
        self.setup()
        tokenizer = self.dataset.tokenizer
        return {
            "samples_consumed": self.samples_consumed(),
            "global_step": self.trainer.global_step if self.trainer is not None else 0,
            "data_fingerprint": self.dataset.fingerprint, "tokenizer_fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size, "dataset": self.dataset.directory.name,
            "tokenizer": tokenizer.to_state(),  # the checkpoint alone can decode its samples
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.setup()
        self._check_same_data(state)
        self._start_sample = int(state["samples_consumed"])
        self._start_step = int(state["global_step"])

    def _check_same_data(self, state: dict[str, Any]) -> None:
        where = f"dataset {self.dataset.directory.name}, vocab {self.vocab_size}"
        theirs = f"dataset {state.get('dataset')}, vocab {state.get('vocab_size')}"
        if state.get("tokenizer_fingerprint") != self.dataset.tokenizer.fingerprint:
            raise ValueError(
                f"the checkpoint was trained with another tokenizer ({theirs}) than this run's data ({where}); "
                "resume with the data settings the checkpoint was trained with"
            )
        if state.get("data_fingerprint") != self.dataset.fingerprint:
            raise ValueError(
                f"the checkpoint was trained on other data ({theirs}, data fingerprint {state.get('data_fingerprint')}) "
                f"than this run's ({where}, data fingerprint {self.dataset.fingerprint}), so its data position means "
                "nothing here; resume with the same data settings, or start a new run from the checkpoint's weights"
            )


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _check_tokenizer(dataset: PreparedDataset, tokenizer_path: str) -> None:
    """A prepared dataset named together with a tokenizer: they must be the same tokenizer."""
    from llmkit.text.tokenizer import load_pretrained_tokenizer

    given = load_pretrained_tokenizer(tokenizer_path)
    if given.fingerprint != dataset.tokenizer.fingerprint:
        raise ShardError(
            f"data.tokenizer_path={tokenizer_path} is not the tokenizer the shards in {dataset.directory} were written "
            f"with (fingerprints {given.fingerprint} and {dataset.tokenizer.fingerprint}); drop data.tokenizer_path to "
            "use the dataset's own, or prepare the data again with this tokenizer"
        )


def _components(
    label: str, source: str, path: Any, max_bytes: int | None, options: dict[str, Any] | None,
    mixture: dict[str, dict[str, Any]] | None,
) -> dict[str, dict[str, Any]]:
    """A mixture as given, or the single source as a mixture of one."""
    if mixture:
        return {name: {"weight": 1.0, **dict(spec)} for name, spec in mixture.items()}
    return {label: {"source": source, "path": path, "max_bytes": max_bytes, **dict(options or {})}}

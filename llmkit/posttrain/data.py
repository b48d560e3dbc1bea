"""Post-training datamodules: a JSONL file -> rendered, masked, packed rows -> batches that resume exactly.

    data=sft         SFTDataModule: conversations (prompt/completion, alpaca, messages, ShareGPT) rendered
                     with a chat template (llmkit/text/chat.py), cut to the context, packed
                     best-fit-decreasing (or padded), as (ids, labels, positions, segments) rows
    data=preference  PreferenceDataModule: (prompt, chosen, rejected) pairs, each side rendered with only
                     its last reply scored and padded to the context, as chosen_* and rejected_* rows

The tokenizer is the base model's (`tokenizer_from`, set to `init_from` by the configs), so data
and model cannot disagree. Rows are prepared once per (file contents, settings, tokenizer) into
`cache_dir/<kind>-<file>-<fingerprint>/` (llmkit/posttrain/rows.py) and read back on every rank and
on resume; the counts (records, truncated, dropped with nothing scored, identical pairs) are in the
manifest and in the run's summary.json. A record goes to val by the hash of its contents (as
pre-training splits documents by name): the split, and so the prepared rows, do not depend on the
run's seed, which only orders the training rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from llmkit.data.streaming import EndlessBatchIndices, samples_consumed
from llmkit.posttrain.formats import read_jsonl
from llmkit.posttrain.packing import IGNORE, pack
from llmkit.posttrain.rows import RowBatches, RowWindows, is_prepared, load_rows, save_rows
from llmkit.text.chat import Rendered, check_template, render_chat, truncate
from llmkit.text.tokenizer import Tokenizer

PREPARE_VERSION = 2  # part of the fingerprint: bump when the rows a file becomes change


class PostTrainDataModule(L.LightningDataModule):
    kind = "posttrain"

    def __init__(
        self, path: str, tokenizer_from: str | None = None, format: str | None = None, template: str = "chatml",
        mask: str = "assistant", packing: bool = True, seq_len: int | None = None, batch_size: int = 8,
        val_fraction: float = 0.1, shuffle: bool = True, seed: int = 1337, cache_dir: str = "data_cache",
        num_workers: int = 0, add_template_tokens: bool = False,
    ) -> None:
        super().__init__()
        if tokenizer_from is None:
            raise ValueError(f"data={self.kind} needs the base model: give init_from=<llmkit checkpoint | Hugging Face dir>")
        self.path, self.tokenizer_from, self.format, self.template = Path(path).expanduser(), tokenizer_from, format, template
        self.mask, self.packing, self._seq_len, self.batch_size = mask, packing, seq_len, batch_size
        self.val_fraction, self.shuffle, self.seed = val_fraction, shuffle, seed
        self.cache_dir, self.num_workers = Path(cache_dir), num_workers
        self.add_template_tokens = add_template_tokens
        self.base_fingerprint: str | None = None  # the base model's tokenizer, before any added tokens
        self._tokenizer: Tokenizer | None = None
        self._fingerprint: str | None = None
        self.splits: dict[str, dict[str, np.ndarray]] | None = None
        self.manifest: dict[str, Any] = {}
        self._start_sample, self._start_step = 0, 0

    # ---- what the model needs to know ------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            from llmkit.posttrain.base import base_tokenizer

            base = base_tokenizer(self.tokenizer_from)
            self.base_fingerprint, self._tokenizer = base.fingerprint, base
            if self.add_template_tokens:  # the model's embeddings grow to match (LitLM, resize_vocabulary)
                from llmkit.text.chat import CHAT_TEMPLATES
                from llmkit.text.tokenizer import add_special_tokens

                self._tokenizer = add_special_tokens(base, CHAT_TEMPLATES.build(self.template).specials)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def seq_len(self) -> int:
        if self._seq_len is None:  # the base model's context
            from llmkit.posttrain.base import base_config

            self._seq_len = base_config(self.tokenizer_from).max_seq_len
        return self._seq_len

    # ---- preparation -------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "format": self.format, "template": self.template, "mask": self.mask,
                "add_template_tokens": self.add_template_tokens, "packing": self.packing, "seq_len": self.seq_len,
                "val_fraction": self.val_fraction, "version": PREPARE_VERSION}

    def fingerprint(self) -> str:
        """Of the file's bytes, the settings and the tokenizer; hashed once (every checkpoint records it)."""
        if self._fingerprint is None:
            if not self.path.is_file():
                raise FileNotFoundError(f"data.path={self.path}: no such file")
            digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
            key = json.dumps({"file": digest, **self.settings(), "tokenizer": self.tokenizer.fingerprint}, sort_keys=True)
            self._fingerprint = hashlib.sha256(key.encode()).hexdigest()[:12]
        return self._fingerprint

    def directory(self) -> Path:
        return self.cache_dir / f"{self.kind}-{self.path.stem}-{self.fingerprint()}"

    def prepare_data(self) -> None:
        directory = self.directory()
        if is_prepared(directory):
            return
        check_template(self.tokenizer, self.template)
        records = read_jsonl(self.path, self.format)
        self.check_records(records)
        train_items, val_items = split_by_content(records.items, self.val_fraction)
        train, counts = self.rows(train_items)
        val, val_counts = self.rows(val_items)
        if not train:
            raise ValueError(f"{self.path}: no training samples left ({len(train_items)} records for training, "
                             f"{counts.get('dropped_no_scored_tokens', 0)} of them with nothing scored in {self.seq_len} tokens)")
        splits = {"train": self.arrays(train), **({"val": self.arrays(val)} if val else {})}
        counts = {key: counts.get(key, 0) + val_counts.get(key, 0) for key in {**counts, **val_counts}}
        manifest = {"fingerprint": self.fingerprint(), "source": str(self.path), "format": records.format,
                    "settings": self.settings(), "tokenizer_fingerprint": self.tokenizer.fingerprint,
                    "counts": {**records.counts, **counts, "train_samples": len(train), "val_samples": len(val)},
                    "splits": sorted(splits)}
        save_rows(directory, splits, manifest)

    def check_records(self, records: Any) -> None:  # a datamodule for one kind of record refuses the other
        pass

    def rows(self, items: list[Any]) -> tuple[list[Any], dict[str, int]]:
        raise NotImplementedError

    def arrays(self, samples: list[Any]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits, self.manifest = load_rows(self.directory())

    def summary(self) -> dict[str, Any]:
        """What summary.json records of the data."""
        return {"dataset": str(self.directory()), "fingerprint": self.manifest.get("fingerprint"),
                "tokenizer_fingerprint": self.tokenizer.fingerprint, "counts": self.manifest.get("counts", {}),
                "samples_consumed": self.samples_consumed()}

    # ---- loaders ---------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        self.setup()
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        batches = RowBatches(self.splits["train"], self.batch_size, self.seed, self.shuffle, rank, world, accumulate,
                             self._start_sample)
        return DataLoader(batches, batch_size=None, sampler=EndlessBatchIndices(), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if "val" not in self.splits:
            return []
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(RowWindows(self.splits["val"], rank, world), batch_size=self.batch_size, shuffle=False)

    # ---- checkpoint state (as LMDataModule's) ---------------------------------------------------------
    def samples_consumed(self) -> int:
        return samples_consumed(self.trainer, self.batch_size, self._start_sample, self._start_step)

    def state_dict(self) -> dict[str, Any]:
        return {"samples_consumed": self.samples_consumed(),
                "global_step": self.trainer.global_step if self.trainer is not None else 0,
                "data_fingerprint": self.fingerprint(), "tokenizer_fingerprint": self.tokenizer.fingerprint,
                "vocab_size": self.tokenizer.vocab_size, "tokenizer": self.tokenizer.to_state(),
                "chat_template": self.template}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("data_fingerprint") != self.fingerprint():
            raise ValueError(
                f"the checkpoint was trained on other post-training data or settings (fingerprint "
                f"{state.get('data_fingerprint')}, this run's {self.fingerprint()}), so its data position means nothing "
                "here; resume with the same data.* settings, or start a new run with init_from=<that checkpoint>")
        self._start_sample, self._start_step = int(state["samples_consumed"]), int(state["global_step"])


class SFTDataModule(PostTrainDataModule):
    kind = "sft"

    def check_records(self, records: Any) -> None:
        if records.is_preference:
            raise ValueError(f"{self.path} holds preference pairs (prompt/chosen/rejected): use data=preference with "
                             "task=dpo or task=reward")

    def rows(self, items: list[Any]) -> tuple[list[Rendered], dict[str, int]]:
        rendered = [render_chat(m, self.tokenizer, self.template, self.mask) for m in items]
        return truncate(rendered, self.seq_len)

    def arrays(self, samples: list[Rendered]) -> dict[str, np.ndarray]:
        packed = pack(samples, self.seq_len, self.packing, pad_id=_pad_id(self.tokenizer))
        return {"ids": packed.ids, "labels": packed.labels, "positions": packed.positions, "segments": packed.segments}


class PreferenceDataModule(PostTrainDataModule):
    kind = "preference"

    def __init__(self, *args: Any, mask: str = "last", packing: bool = False, **kwargs: Any) -> None:
        if packing:
            raise ValueError("data=preference rows are not packed (each pair is a chosen and a rejected row)")
        super().__init__(*args, mask=mask, packing=False, **kwargs)

    def check_records(self, records: Any) -> None:
        if not records.is_preference:
            raise ValueError(f"{self.path} holds {records.format} records, not preference pairs (prompt, chosen, "
                             "rejected): use data=sft for them")

    def rows(self, items: list[Any]) -> tuple[list[tuple[Rendered, Rendered, float]], dict[str, int]]:
        pairs, dropped = [], 0
        for pair in items:
            sides = [render_chat([*pair.prompt, *reply], self.tokenizer, self.template, self.mask)
                     for reply in (pair.chosen, pair.rejected)]
            kept, _ = truncate(sides, self.seq_len)
            if len(kept) == 2:
                pairs.append((kept[0], kept[1], pair.margin))
            else:
                dropped += 1
        return pairs, {"pairs": len(items), "dropped_no_scored_tokens": dropped, "kept": len(pairs)}

    def arrays(self, samples: list[tuple[Rendered, Rendered, float]]) -> dict[str, np.ndarray]:
        out = {"margin": np.array([pair[2] for pair in samples], dtype=np.float32)}
        for side, index in (("chosen", 0), ("rejected", 1)):
            packed = pack([pair[index] for pair in samples], self.seq_len, packing=False, pad_id=_pad_id(self.tokenizer))
            out[f"{side}_ids"], out[f"{side}_labels"] = packed.ids, packed.labels
        return out


def split_by_content(items: list[Any], val_fraction: float) -> tuple[list[Any], list[Any]]:
    """(train, val): a record goes to val by the hash of its contents, as pre-training splits documents by
    name, so the split does not depend on the run's seed, the file's order, or what else the file holds."""
    train, val = [], []
    for item in items:
        content = json.dumps(asdict(item) if is_dataclass(item) else item, sort_keys=True)
        bucket = int.from_bytes(hashlib.sha256(content.encode()).digest()[:8], "big") / 2**64
        (val if bucket < val_fraction else train).append(item)
    return train, val


def _pad_id(tokenizer: Tokenizer) -> int:
    for candidate in (tokenizer.pad_id, tokenizer.eos_id):
        if candidate is not None:
            return candidate
    return 0


__all__ = ["IGNORE", "PreferenceDataModule", "SFTDataModule"]

"""Prompt data for online RL (`data=prompts`): a JSONL file of prompts and the fields rewards read.

Each record has a `prompt` (a string, or a list of chat messages) or `messages` (chat messages), and
any other fields (`answer`, ...), which reward functions receive. The prompt is rendered with a chat
template from llmkit/text/chat.py up to the opening of the assistant turn (template=raw: the text as
it is), with the base model's tokenizer; a prompt that leaves fewer than max_completion_length
tokens of the model's context is dropped and counted (summary.json). Prepared once per (file,
settings, tokenizer) into cache_dir, as the other post-training data (llmkit/posttrain/data.py).

With data.val_fraction > 0, records are held out by the hash of their contents (as for SFT data) and
every validation samples their completions as a rollout does (seeded by the validation batch, so
each validation draws the same numbers) and logs val/reward and the completion lengths.

Batches resume exactly and follow the rollouts: the micro-batch of optimizer step s, accumulation
slot m, rank r holds prompt batch b = (s // repeat) * A + m, rows (b * W + r) * B + [0, B) of the
seeded order (llmkit/posttrain/rows.py). `repeat` is the objective's num_iterations: a rollout is
updated on that many steps, so its prompts come back that many times. A position is a step number.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from llmkit.data.streaming import EndlessBatchIndices
from llmkit.jsonl import read_records
from llmkit.posttrain.data import PostTrainDataModule, split_by_content
from llmkit.posttrain.rows import RowBatches, is_prepared, save_rows
from llmkit.text.chat import check_template, render_generation_prompt


class PromptDataModule(PostTrainDataModule):
    kind = "prompts"

    def __init__(self, *args: Any, max_completion_length: int = 64, repeat: int = 1, **kwargs: Any) -> None:
        kwargs.setdefault("val_fraction", 0.0)
        super().__init__(*args, packing=False, **kwargs)
        if repeat < 1:
            raise ValueError(f"data.repeat={repeat}: a rollout's prompts come at least once")
        self.max_completion_length, self.repeat = max_completion_length, repeat

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "template": self.template, "seq_len": self.seq_len,
                "max_completion_length": self.max_completion_length, "val_fraction": self.val_fraction, "version": 2}

    @property
    def max_prompt_length(self) -> int:
        return self.seq_len - self.max_completion_length

    def prepare_data(self) -> None:
        directory = self.directory()
        if is_prepared(directory):
            return
        check_template(self.tokenizer, self.template)
        if self.max_prompt_length < 1:
            raise ValueError(f"max_completion_length={self.max_completion_length} leaves no room for a prompt in the "
                             f"model's context of {self.seq_len} tokens: lower it")
        records = read_records(self.path)
        held_out = {id(r) for r in split_by_content([r for _, r in records], self.val_fraction)[1]}  # by content only
        train_records = [(line, r) for line, r in records if id(r) not in held_out]
        val_records = [(line, r) for line, r in records if id(r) in held_out]
        (train, too_long), (val, val_too_long) = self.encode(train_records), self.encode(val_records)
        if not train:
            raise ValueError(f"{self.path}: no training prompt fits {self.max_prompt_length} tokens (the context "
                             f"{self.seq_len} less max_completion_length {self.max_completion_length}); {too_long} "
                             f"were too long{f', {len(val_records)} held out' if val_records else ''}")
        splits = {"train": prompt_arrays(train), **({"val": prompt_arrays(val)} if val else {})}
        manifest = {"fingerprint": self.fingerprint(), "source": str(self.path), "format": "prompts",
                    "settings": self.settings(), "tokenizer_fingerprint": self.tokenizer.fingerprint,
                    "counts": {"records": len(records), "prompts": len(train) + len(val),
                               "dropped_too_long": too_long + val_too_long, "train_samples": len(train),
                               "val_samples": len(val)},
                    "splits": sorted(splits)}
        save_rows(directory, splits, manifest)

    def encode(self, records: list[tuple[int, dict[str, Any]]]) -> tuple[list[tuple[list[int], dict[str, Any]]], int]:
        """(line, record) -> the (prompt ids, record) that leave room for a completion, and how many did not."""
        kept, too_long = [], 0
        for line, record in records:
            ids = render_generation_prompt(_messages(record, line, self.path), self.tokenizer, self.template)
            if len(ids) > self.max_prompt_length or not ids:
                too_long += 1
            else:
                kept.append((ids, record))
        return kept, too_long

    # ---- loaders ---------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        self.setup()
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        batches = PromptBatches(self.splits["train"], self.batch_size, self.seed, self.shuffle, rank, world,
                                accumulate, start_step=self._start_step, repeat=self.repeat)
        return DataLoader(batches, batch_size=None, sampler=EndlessBatchIndices(), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if "val" not in self.splits:
            return []  # the training rollouts' rewards are logged anyway
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        windows = PromptWindows(self.splits["val"], self.batch_size, rank, world, self.seed)
        return DataLoader(windows, batch_size=None, shuffle=False)

    def samples_consumed(self) -> int:
        """Prompts taken by every rank together (each counted once however many updates reuse it)."""
        trainer = self.trainer
        step = trainer.global_step if trainer is not None else self._start_step
        per_rollout = (trainer.accumulate_grad_batches * trainer.world_size if trainer is not None else 1) * self.batch_size
        return -(-step // self.repeat) * per_rollout

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "repeat": self.repeat}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("repeat", 1) != self.repeat:
            raise ValueError(f"the checkpoint reused each rollout {state.get('repeat')} times, this run "
                             f"{self.repeat} (task.num_iterations): resume with the same setting")


class PromptBatches(RowBatches):
    """Item k: this rank's micro-batch k after step `start_step`, as {index, rows (PromptRows), step, micro,
    iteration, seed, rank}; the objective generates from it (or reuses the rollout of iteration 0)."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int, shuffle: bool, rank: int,
                 world_size: int, accumulate: int, start_step: int, repeat: int) -> None:
        super().__init__(arrays, batch_size, seed, shuffle, rank, world_size, accumulate)
        self.start_step, self.repeat = start_step, repeat

    def __getitem__(self, k: int) -> dict[str, Any]:
        step, micro = self.start_step + k // self.accumulate, k % self.accumulate
        batch = (step // self.repeat) * self.accumulate + micro  # the rollout's prompt batch
        first = (batch * self.world_size + self.rank) * self.batch_size
        rows = self.rows_of(np.arange(first, first + self.batch_size))
        return {**prompt_batch(self.arrays, rows), "step": step, "micro": micro, "iteration": step % self.repeat,
                "seed": self.seed, "rank": self.rank}


class PromptWindows(Dataset):
    """Validation: every held-out prompt once, rank r taking rows r, r + W, ... in batches of B. Every rank
    has the same number of batches (a sharded model's forwards are collectives): a rank short of rows
    repeats its first one, marked not `counted`."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, rank: int, world_size: int, seed: int) -> None:
        rows = len(arrays["prompt_len"])
        per_rank = -(-rows // world_size)
        self.rows = [rank + world_size * j for j in range(per_rank)]
        self.arrays, self.batch_size, self.rank, self.seed = arrays, batch_size, rank, seed
        self.counted = [row < rows for row in self.rows]
        self.rows = [row if row < rows else self.rows[0] % rows for row in self.rows]

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __getitem__(self, i: int) -> dict[str, Any]:
        window = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return {**prompt_batch(self.arrays, np.array(self.rows[window])), "counted": self.counted[window],
                "val_batch": i, "seed": self.seed, "rank": self.rank}


def prompt_arrays(prompts: list[tuple[list[int], dict[str, Any]]]) -> dict[str, np.ndarray]:
    """(prompt ids, record) pairs -> the split's arrays: ids right-padded with -1, lengths, records as JSON."""
    width = max(len(ids) for ids, _ in prompts)
    ids = np.full((len(prompts), width), -1, dtype=np.int64)
    for row, (prompt, _) in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    return {"prompt_ids": ids, "prompt_len": np.array([len(p) for p, _ in prompts], dtype=np.int64),
            "records": np.array([json.dumps(r) for _, r in prompts])}


class PromptRows:
    """A micro-batch's prompts as the rollout reads them: token ids, prompts (text or messages), records. Not
    a list or a dict on purpose: Lightning's device transfer and the DataLoader's conversion walk those element
    by element, every token id of every prompt (~0.1 ms per 100 ids, each step), and nothing here is moved."""

    __slots__ = ("tokens", "prompts", "records")

    def __init__(self, tokens: list[list[int]], prompts: list[Any], records: list[dict[str, Any]]) -> None:
        self.tokens, self.prompts, self.records = tokens, prompts, records


def prompt_batch(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, Any]:
    """The rows' indices and their PromptRows."""
    lengths = arrays["prompt_len"][rows]
    records = [json.loads(str(s)) for s in arrays["records"][rows]]
    tokens = [arrays["prompt_ids"][r, :n].tolist() for r, n in zip(rows, lengths, strict=True)]
    return {"index": torch.from_numpy(rows.copy()),  # a tensor first: Lightning reads the batch size from it
            "rows": PromptRows(tokens, [r.get("prompt", r.get("messages")) for r in records], records)}


def _messages(record: dict[str, Any], line: int, path: Any) -> list[dict[str, Any]]:
    prompt = record.get("prompt", record.get("messages"))
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return prompt
    raise ValueError(f"{path}, line {line}: a prompt record needs 'prompt' (a string or a list of {{role, content}} messages) "
                     f"or 'messages'; it has {', '.join(record) or 'nothing'}")

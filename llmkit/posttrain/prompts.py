"""Prompt data for online RL (`data=prompts`): a JSONL file of prompts and the fields rewards read.

Each record has a `prompt` (a string, or a list of chat messages) or `messages` (chat messages), and
any other fields (`answer`, ...), which reward functions receive. The prompt is rendered with a chat
template from llmkit/text/chat.py up to the opening of the assistant turn (template=raw: the text as
it is), with the base model's tokenizer; a prompt that leaves fewer than max_completion_length
tokens of the model's context is dropped and counted (summary.json). Prepared once per (file,
settings, tokenizer) into cache_dir, as the other post-training data (llmkit/posttrain/data.py).

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
from torch.utils.data import DataLoader

from llmkit.data.streaming import EndlessBatchIndices
from llmkit.jsonl import read_records
from llmkit.posttrain.data import PostTrainDataModule
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
                "max_completion_length": self.max_completion_length, "version": 1}

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
        kept, prompts, too_long = [], [], 0
        for line, record in records:
            ids = render_generation_prompt(_messages(record, line, self.path), self.tokenizer, self.template)
            if len(ids) > self.max_prompt_length or not ids:
                too_long += 1
                continue
            kept.append(record)
            prompts.append(ids)
        if not kept:
            raise ValueError(f"{self.path}: no prompt fits {self.max_prompt_length} tokens (the context {self.seq_len} "
                             f"less max_completion_length {self.max_completion_length}); {too_long} were too long")
        width = max(map(len, prompts))
        ids = np.full((len(prompts), width), -1, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        arrays = {"prompt_ids": ids, "prompt_len": np.array(list(map(len, prompts)), dtype=np.int64),
                  "records": np.array([json.dumps(r) for r in kept])}
        manifest = {"fingerprint": self.fingerprint(), "source": str(self.path), "format": "prompts",
                    "settings": self.settings(), "tokenizer_fingerprint": self.tokenizer.fingerprint,
                    "counts": {"records": len(records), "prompts": len(kept), "dropped_too_long": too_long,
                               "train_samples": len(kept)},
                    "splits": ["train"]}
        save_rows(directory, {"train": arrays}, manifest)

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

    def val_dataloader(self) -> list:
        return []  # rewards are logged on the rollouts themselves

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
    """Item k: this rank's micro-batch k after step `start_step`, as {index, prompt_tokens, prompts, records,
    step, micro, iteration}; the objective generates from it (or reuses the rollout of iteration 0)."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int, shuffle: bool, rank: int,
                 world_size: int, accumulate: int, start_step: int, repeat: int) -> None:
        super().__init__(arrays, batch_size, seed, shuffle, rank, world_size, accumulate)
        self.start_step, self.repeat = start_step, repeat

    def __getitem__(self, k: int) -> dict[str, Any]:
        step, micro = self.start_step + k // self.accumulate, k % self.accumulate
        batch = (step // self.repeat) * self.accumulate + micro  # the rollout's prompt batch
        first = (batch * self.world_size + self.rank) * self.batch_size
        rows = self.rows_of(np.arange(first, first + self.batch_size))
        lengths = self.arrays["prompt_len"][rows]
        records = [json.loads(str(s)) for s in self.arrays["records"][rows]]
        return {"index": torch.from_numpy(rows.copy()),  # a tensor first: Lightning reads the batch size from it
                "prompt_tokens": [self.arrays["prompt_ids"][r, :n].tolist() for r, n in zip(rows, lengths, strict=True)],
                "prompts": [r.get("prompt", r.get("messages")) for r in records], "records": records,
                "step": step, "micro": micro, "iteration": step % self.repeat, "seed": self.seed, "rank": self.rank}


def _messages(record: dict[str, Any], line: int, path: Any) -> list[dict[str, Any]]:
    prompt = record.get("prompt", record.get("messages"))
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return prompt
    raise ValueError(f"{path}, line {line}: a prompt record needs 'prompt' (a string or a list of {{role, content}} messages) "
                     f"or 'messages'; it has {', '.join(record) or 'nothing'}")

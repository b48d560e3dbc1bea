"""Downstream benchmarks during training (callbacks=downstream): every `every_n_steps` optimizer steps,
and at the end, the model answers a fixed seeded subset of each task's questions through the same scorer
as `llmkit bench` (llmkit/bench/runner.py), so its numbers equal `llmkit bench` on the checkpoint saved
at that step with the same limit and seed.

Each rank scores every world_size-th question (shards padded to equal length with repeats, so every
rank runs the same number of batches); the records are gathered and de-duplicated by question id
before the metrics. Logged to every logger as eval/<task>/<metric> and eval/seconds; the last values go
into summary.json (llmkit/run_summary.py) and the per-question records of the last evaluation into
downstream.json in the run directory, which `llmkit report` uses for paired comparisons between arms.
Nothing here is checkpointed: an exactly resumed run evaluates at the same steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from llmkit.bench.metrics import METRICS, random_baseline, summarize
from llmkit.bench.runner import SCORERS, load_tasks
from llmkit.bench.tasks import Task
from llmkit.lit.callbacks import ThroughputMonitor


class DownstreamEval(Callback):
    def __init__(self, tasks: list[str], every_n_steps: int = 1000, limit: int | float | None = 200, num_fewshot: int = 0,
                 seed: int = 1234, batch_size: int = 16, data_dir: str | None = None, tasks_dir: str | None = None,
                 at_end: bool = True, output_dir: str | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.downstream.every_n_steps={every_n_steps}: give a number of optimizer steps >= 1")
        self.task_names, self.every_n_steps, self.at_end = [str(t) for t in tasks], every_n_steps, at_end
        self.load = {"data_dir": data_dir, "tasks_dir": tasks_dir, "num_fewshot": num_fewshot, "seed": seed, "limit": limit}
        self.batch_size, self.output_dir = batch_size, output_dir
        self.tasks: list[Task] = []
        self.last: dict[str, float] = {}  # eval/<task>/<metric> -> value of the latest evaluation
        self._evaluated_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.tasks:  # at start-up, so that a missing task or data stops the run before training
            self.tasks = load_tasks(self.task_names, **self.load)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._evaluated_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and trainer.global_step != self._evaluated_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        start, tokenizer = time.perf_counter(), trainer.datamodule.tokenizer
        values, samples = {}, {}
        for task in self.tasks:
            mine = replace(task, docs=shard(task.docs, trainer.global_rank, trainer.world_size))
            records = dedup(gather(SCORERS.get(task.kind)(pl_module.model, tokenizer, mine, batch_size=self.batch_size)))
            keys = METRICS[task.kind] or tuple(k for k in records[0] if k.startswith("pass@"))
            for metric, m in summarize(records, keys).items():
                values[f"eval/{task.name}/{metric}"] = m["value"]
            samples[task.name] = {"primary": task.primary, "random_baseline": random_baseline(task.kind, task.docs),
                                  "samples": records}
        values["eval/seconds"] = time.perf_counter() - start
        self.last, self._evaluated_step = values, trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        if trainer.is_global_zero:
            self._write(trainer, samples)
        for callback in trainer.callbacks:  # the next step's time must not include this evaluation
            if isinstance(callback, ThroughputMonitor):
                callback.on_validation_start(trainer, pl_module)
        return values

    def _write(self, trainer: L.Trainer, samples: dict[str, Any]) -> None:
        out = Path(self.output_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {"step": trainer.global_step, "values": self.last, "tasks": samples}
        (out / "downstream.json").write_text(json.dumps(record) + "\n")


def shard(docs: list[Any], rank: int, world: int) -> list[Any]:
    """Every world-th document from `rank`, padded with the shard's last one to ceil(n / world): every
    rank runs the same number of batches (FSDP's forwards are collective); dedup() drops the repeats."""
    mine = docs[rank::world]
    size = -(-len(docs) // world)
    return mine + mine[-1:] * (size - len(mine)) if mine else docs[:1] * size


def gather(records: list[dict]) -> list[dict]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records
    everyone: list[list[dict] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, records)
    return [r for part in everyone for r in part or []]


def dedup(records: list[dict]) -> list[dict]:
    """One record per question, in question order."""
    return sorted({r["doc_id"]: r for r in records}.values(), key=lambda r: r["doc_id"])


def last_values(trainer: L.Trainer) -> dict[str, float]:
    """The latest eval/<task>/<metric> values of the run's DownstreamEval, for summary.json ({} without one)."""
    return next((dict(c.last) for c in trainer.callbacks if isinstance(c, DownstreamEval)), {})

"""Benchmark: the streaming loader (llmkit/data/streaming.py) on this machine.

Prints:
  1. loader throughput from local shards, in tokens/s in one process, through the same DataLoader
     train.py uses (num_workers=0: everything below is one process), for packed sequences with and
     without document masking, random windows, and a 3-way mixture; goal >= 20M tokens/s, and the
     ratio to what the CPU training loop consumes (measured in part 2);
  2. a real training run (Lightning, experiment=shakespeare_char_cpu, prepared Tiny Shakespeare
     shards, packed sequences): the time spent fetching batches against the step time. Two figures:
     the time inside the dataset (`TrainBatches.__getitem__`), and the whole gap from the end of one
     training step to the start of the next (fetch plus Lightning's own bookkeeping), each as a share
     of the step time; goal: waiting for data < 1% of the step time.

  python scripts/bench_loader.py [--tokens 64000000] [--steps 200] [--data ../shared/data/tinyshakespeare.txt]

About a minute on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmkit.data import LMDataModule  # noqa: E402
from llmkit.data.encode import ShardWriter  # noqa: E402
from llmkit.data.streaming import (  # noqa: E402
    EndlessBatchIndices,
    Mixture,
    PackedSequences,
    RandomWindows,
    TokenStream,
    TrainBatches,
)
from llmkit.lit.module import LitLM  # noqa: E402

GOAL_TOKENS_PER_S = 20e6


def synthetic_stream(directory: Path, tokens: int, seed: int) -> TokenStream:
    """Random ids in documents of 50-3000 tokens, in shards of 2^24 tokens, as prepare_data writes them."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    writer = ShardWriter(directory, "train", np.dtype(np.uint16), 1 << 24)
    written = 0
    while written < tokens:
        doc = rng.integers(0, 50_000, size=int(rng.integers(50, 3000)), dtype=np.uint16)
        writer.add(doc)
        written += len(doc)
    entries = writer.close()
    return TokenStream([directory / e["file"] for e in entries], entries, np.dtype(np.uint16))


def loader_tokens_per_s(batches: TrainBatches, seconds: float = 3.0) -> float:
    loader = DataLoader(batches, batch_size=None, sampler=EndlessBatchIndices(), num_workers=0)
    tokens, start = 0, time.perf_counter()
    for batch in loader:
        tokens += batch[0].numel()
        if time.perf_counter() - start > seconds:
            break
    return tokens / (time.perf_counter() - start)


def loader_cases(streams: list[TokenStream]) -> dict[str, TrainBatches]:
    one = Mixture([1.0], 0)
    cases = {}
    for seq_len, batch in ((128, 16), (1024, 8), (2048, 8)):
        packed = [PackedSequences(streams[0], seq_len, 0)]
        cases[f"packed        T={seq_len:<4} B={batch}"] = TrainBatches(packed, one, batch)
        cases[f"packed + mask T={seq_len:<4} B={batch}"] = TrainBatches(packed, one, batch, document_mask=True)
    cases["random        T=1024 B=8"] = TrainBatches([RandomWindows(streams[0], 1024, 0)], one, 8)
    mixed = [PackedSequences(s, 1024, i) for i, s in enumerate(streams)]
    cases["mixture of 3  T=1024 B=8"] = TrainBatches(mixed, Mixture([0.5, 0.3, 0.2], 0), 8)
    return cases


class DataWait(L.Callback):
    """Step time, and the gap between one step's end and the next step's start."""

    def __init__(self, warmup: int = 10) -> None:
        self.warmup, self.steps, self.gaps = warmup, [], []
        self._start = self._end = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._end is not None and batch_idx > self.warmup:
            self.gaps.append(now - self._end)
        self._start = now

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._end = time.perf_counter()
        if batch_idx > self.warmup:
            self.steps.append(self._end - self._start)


class TimedBatches(TrainBatches):
    fetch_seconds: list[float] = []

    def __getitem__(self, k: int):
        start = time.perf_counter()
        batch = super().__getitem__(k)
        TimedBatches.fetch_seconds.append(time.perf_counter() - start)
        return batch


def training_wait(data: Path, cache: Path, steps: int) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=shakespeare_char_cpu", "data.sampling=epoch"])
    data_cfg = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=False).items() if k != "_target_"}
    data_cfg.update(path=str(data), cache_dir=str(cache), seed=cfg.seed, progress=False)
    datamodule = LMDataModule(**data_cfg)
    original = datamodule.train_batches

    def timed(rank: int = 0, world_size: int = 1) -> TrainBatches:
        timed_batches = original(rank, world_size)
        timed_batches.__class__ = TimedBatches
        return timed_batches

    datamodule.train_batches = timed
    lit = LitLM(
        model=OmegaConf.to_container(cfg.model, resolve=True), optim=OmegaConf.to_container(cfg.optim),
        scheduler=OmegaConf.to_container(cfg.scheduler),
    )
    wait = DataWait()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
        gradient_clip_val=cfg.trainer.gradient_clip_val, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[wait],
    )
    trainer.fit(lit, datamodule=datamodule)
    step = statistics.median(wait.steps)
    return {
        "step_ms": step * 1e3, "fetch_ms": statistics.median(TimedBatches.fetch_seconds[10:]) * 1e3,
        "gap_ms": statistics.median(wait.gaps) * 1e3, "tokens_per_s": datamodule.batch_size * datamodule.seq_len / step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64_000_000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"no Tiny Shakespeare text at {args.data}; pass --data /path/to/tinyshakespeare.txt")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = training_wait(args.data, tmp / "cache", args.steps)
        streams = [synthetic_stream(tmp / f"s{i}", args.tokens // (1 if i == 0 else 8), i) for i in range(3)]
        print(f"1. loader throughput, one process, {streams[0].total / 1e6:.0f}M-token stream in "
              f"{len(streams[0].shards)} shards (memory-mapped, page cache warm after the first pass)")
        print(f"   {'case':28s} {'tokens/s':>14} {'vs goal 20M':>12} {'vs training':>12}")
        for name, batches in loader_cases(streams).items():
            rate = loader_tokens_per_s(batches)
            print(f"   {name:28s} {rate:14,.0f} {rate / GOAL_TOKENS_PER_S:11.1f}x {rate / run['tokens_per_s']:11,.0f}x")

    print(f"\n2. training run: experiment=shakespeare_char_cpu (T=64, B=12), packed sequences, {args.steps} steps, medians")
    print(f"   step time                      {run['step_ms']:8.2f} ms   ({run['tokens_per_s']:,.0f} tokens/s consumed)")
    for label, key, note in (("inside the dataset (fetch)", "fetch_ms", ""),
                             ("step end -> next step start", "gap_ms", " (fetch + Lightning bookkeeping)")):
        print(f"   {label:30s} {run[key]:8.3f} ms   {100 * run[key] / run['step_ms']:5.2f}% of a step{note}")


if __name__ == "__main__":
    main()

"""Benchmark: nanoGPT's CPU configuration on char-level Tiny Shakespeare.

Prints, side by side:
  1. full training runs through `train.py experiment=shakespeare_char_cpu` (GPT-style components
     and, at the same size, gqa_rope components): steady-state step time, tokens/s, MFU, val loss;
  2. the per-step overhead of the Lightning loop against a bare PyTorch loop over the same model
     and the same batches, both measured in this process;
  3. the time from launching `python train.py` to the first training step, data cached.

  python scripts/bench_shakespeare.py [--steps 2000] [--overhead-steps 300] [--data PATH]

Reference (DESIGN.md, same machine): nanoGPT runs this configuration at about 35 ms/step
(about 22k tokens/s) and reaches val loss 1.886 at step 2000.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.optim.lr_scheduler import LambdaLR

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmkit.data import LMDataModule  # noqa: E402
from llmkit.lit.callbacks import ThroughputMonitor  # noqa: E402
from llmkit.lit.module import LitLM  # noqa: E402
from llmkit.lit.optim import OPTIMIZERS, SCHEDULES  # noqa: E402

NANOGPT_MS_PER_STEP = 35.0
NANOGPT_VAL_LOSS = 1.886
WARMUP = 10  # steps excluded from medians in the overhead comparison


def full_run(name: str, overrides: list[str], steps: int, data: Path, cache: Path, out: Path) -> dict:
    run_dir = out / name
    cmd = [
        sys.executable, str(ROOT / "train.py"), "experiment=shakespeare_char_cpu", f"data.path={data}",
        f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", *overrides,
    ]
    env = {**os.environ, "LLMKIT_DATA_DIR": str(cache)}
    launched = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["launch_to_first_step_s"] = summary["first_step_unix_time"] - launched
    return summary


def compose_experiment(data: Path, cache: Path) -> OmegaConf:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=shakespeare_char_cpu", f"data.path={data}"])
    data_cfg = OmegaConf.to_container(cfg.data, resolve=False)
    data_cfg.update(path=str(data), cache_dir=str(cache), seed=cfg.seed)
    return cfg, {k: v for k, v in data_cfg.items() if k != "_target_"}


def bare_loop(lit: LitLM, dataset, start: int, steps: int, clip: float) -> list[float]:
    """The minimal PyTorch loop: forward, backward, clip, AdamW step, schedule step."""
    model = lit.model
    optim = dict(lit.hparams.optim)
    optimizer = OPTIMIZERS.build(optim.pop("name"), model=model, **optim)
    schedule = dict(lit.hparams.scheduler)
    scheduler = LambdaLR(optimizer, SCHEDULES.build(schedule.pop("name"), total_steps=2000, **schedule))
    times = []
    for k in range(start, start + steps):
        t0 = time.perf_counter()
        inputs, targets = dataset[k]
        model.loss(inputs, targets).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times[WARMUP:]


def lightning_loop(cfg, data_kwargs: dict, steps: int, out: Path) -> tuple[list[float], LitLM, LMDataModule]:
    datamodule = LMDataModule(**data_kwargs)
    lit = LitLM(
        model=OmegaConf.to_container(cfg.model, resolve=True), optim=OmegaConf.to_container(cfg.optim),
        scheduler=OmegaConf.to_container(cfg.scheduler),
    )
    monitor = ThroughputMonitor(warmup_steps=WARMUP)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
        gradient_clip_val=cfg.trainer.gradient_clip_val, log_every_n_steps=10, use_distributed_sampler=False,
        callbacks=[monitor, instantiate(cfg.callbacks.progress_bar)],  # as configured for real runs
        logger=L.pytorch.loggers.CSVLogger(out, name="overhead"), enable_checkpointing=False,
        enable_progress_bar=True, enable_model_summary=False,
    )
    trainer.fit(lit, datamodule=datamodule)
    return monitor.step_times, lit, datamodule


def overhead(data: Path, cache: Path, steps: int, out: Path) -> dict:
    cfg, data_kwargs = compose_experiment(data, cache)
    L.seed_everything(cfg.seed)
    lightning_times, lit, datamodule = lightning_loop(cfg, data_kwargs, steps, out)
    tokens = datamodule.batch_size * datamodule.seq_len
    # the bare loop continues on the same model with the next batches of the same dataset
    dataset = datamodule.train_batches()
    bare_times = bare_loop(lit, dataset, steps, steps, cfg.trainer.gradient_clip_val)
    lightning_ms = statistics.median(lightning_times) * 1000
    bare_ms = statistics.median(bare_times) * 1000
    return {"lightning_ms": lightning_ms, "bare_ms": bare_ms, "tokens_per_step": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--overhead-steps", type=int, default=300)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    parser.add_argument("--skip-full", action="store_true", help="only the overhead and start-up measurements")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"no Tiny Shakespeare text at {args.data}; pass --data /path/to/tinyshakespeare.txt")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, data {args.data}")
        runs = {}
        if not args.skip_full:
            for name, extra in (("gpt (nanoGPT components)", []), ("gqa_rope components", ["model=gqa_rope"])):
                runs[name] = full_run(name.split()[0], extra, args.steps, args.data, cache, tmp)
        else:  # a short run still measures start-up with the data cached
            short = ["trainer.val_check_interval=20"]
            full_run("warm", short, 20, args.data, cache, tmp)
            runs["gpt (20 steps)"] = full_run("startup", short, 20, args.data, cache, tmp)
        result = overhead(args.data, cache, args.overhead_steps, tmp)

    print(f"\n== full runs: {args.steps} steps, batch 12 x 64 tokens ==")
    header = ("run", "params", "ms/step", "tok/s", "vs nanoGPT", "MFU", "val loss", "start s")
    print("{:28s} {:>9s} {:>8s} {:>8s} {:>10s} {:>6s} {:>9s} {:>8s}".format(*header))
    for name, s in runs.items():
        speed = NANOGPT_MS_PER_STEP / s["median_step_ms"]
        print(
            f"{name:28s} {s['params']:9d} {s['median_step_ms']:8.1f} {s['tokens_per_s']:8.0f} {speed:9.2f}x "
            f"{s['mfu']:6.1%} {s['final_val_loss']:9.4f} {s['launch_to_first_step_s']:8.1f}"
        )
    print(f"{'nanoGPT (DESIGN.md)':28s} {'':9s} {NANOGPT_MS_PER_STEP:8.1f} {768 / NANOGPT_MS_PER_STEP * 1000:8.0f} "
          f"{'1.00x':>10s} {'':6s} {NANOGPT_VAL_LOSS:9.4f}")
    ratio = result["lightning_ms"] / result["bare_ms"]
    print(f"\n== loop overhead, same model and batches, {args.overhead_steps} steps each, medians ==")
    for label, key in (("bare PyTorch loop", "bare_ms"), ("Lightning loop", "lightning_ms")):
        print(f"{label:20s}{result[key]:7.2f} ms/step  {result['tokens_per_step'] / result[key] * 1000:8.0f} tok/s")
    print(f"overhead            {result['lightning_ms'] - result['bare_ms']:+7.2f} ms/step  (ratio {ratio:.3f})")


if __name__ == "__main__":
    main()

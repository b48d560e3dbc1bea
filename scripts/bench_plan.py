"""Benchmark: `llmkit plan`'s peak per rank against the peak resident set measured in training runs.

Each configuration is one `llmkit train` subprocess of --steps steps (no validation, no checkpoint
callback, one sampled token) on data prepared once; its peak is
`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` read by a wrapper process that started nothing else
(with fsdp_cpu the largest rank). The table prints the plan's parts, its peak, the measured peak and
measured / plan; the pre-flight keeps `preflight_margin` (10%) above the plan. Runs go one at a time:
RSS does not depend on what else the machine runs, timings would.

  python scripts/bench_plan.py                      # every configuration (a few minutes on 2 cores)
  python scripts/bench_plan.py --only rope,alibi_selective --steps 4
  python scripts/bench_plan.py --set data.batch_size=8 --cache /tmp/plan_cache
  python scripts/bench_plan.py --only issue_alibi_selective,issue_rope   # the issue's sizes (slow on a CPU)

On a GPU the same table with trainer=gpu compares with torch.cuda.max_memory_reserved (tests/test_plan.py's
gpu test); none was lent to the session that wrote this script.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9

# data prepared once: 400 kB of the offline default corpus, a 2048-token BPE vocabulary
DATA = ["data.max_bytes=400000", "data.split=tail", "data.vocab_size=2048"]
# a run as the issue measured it: no validation, no checkpoint callback, no logger, one sampled token
RUN = ["trainer.limit_val_batches=0", "~callbacks.checkpoint", "trainer.enable_progress_bar=false",
       "logger=none", "sample.max_new_tokens=1"]
# small widths and long rows: activations and logits dominate the ~0.45 GB runtime at a few seconds a step
SMALL = ["model=gqa_rope", "model.d_model=128", "model.n_layers=4", "data.seq_len=256", "data.batch_size=16"]
ISSUE = ["model=gqa_rope", "data.seq_len=512", "data.batch_size=8"]  # d_model 512, 8 layers (the preset)
CONFIGS = {
    "rope": SMALL,
    "alibi": SMALL + ["model/position=alibi"],
    "alibi_selective": SMALL + ["model/position=alibi", "activation_checkpointing=selective"],
    "t5_full": SMALL + ["model/position=t5", "activation_checkpointing=full"],
    "learned_mha": SMALL + ["model/position=learned", "model/attention=mha", "model/norm=layernorm", "model/ffn=mlp"],
    "window_alibi": SMALL + ["model/position=alibi", "model/attention=sliding_window"],
    "moe": SMALL + ["model/ffn=moe", "model.ffn.n_experts=4"],
    "rope_full": SMALL + ["activation_checkpointing=full", "data.batch_size=32"],
    "foreach_adamw": SMALL + ["optim.fused=false", "model.d_model=256"],
    "wide_alibi": ["model=gqa_rope", "model/position=alibi", "model.d_model=256", "model.n_layers=4",
                   "data.seq_len=512", "data.batch_size=8"],
    "fsdp_cpu": SMALL + ["trainer=fsdp_cpu", "model/position=alibi"],
    "issue_alibi_selective": ISSUE + ["model/position=alibi", "activation_checkpointing=selective"],
    "issue_rope": ISSUE + ["model/position=rope"],
}
DEFAULT = [name for name in CONFIGS if not name.startswith("issue_")]


def prepare(cache: Path) -> Path:
    """The prepared dataset directory (made once per cache directory)."""
    found = sorted(p.parent for p in cache.glob("stdlib-*/manifest.json"))
    if not found:
        subprocess.run([sys.executable, "-m", "llmkit", "prepare", f"data.cache_dir={cache}", "data.progress=false",
                        *DATA], cwd=ROOT, check=True, capture_output=True, text=True)
        found = sorted(p.parent for p in cache.glob("stdlib-*/manifest.json"))
    return found[-1]


def train_overrides(overrides: list[str], prepared: Path, run_dir: Path, steps: int) -> list[str]:
    return [f"data.prepared={prepared}", "data.vocab_size=2048", f"hydra.run.dir={run_dir}",
            f"trainer.max_steps={steps}", *RUN, *overrides]


# the wrapper: a fresh process whose only children are the run (and its ranks)
_WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print('maxrss', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, r.returncode)")


def measure(overrides: list[str], env: dict[str, str] | None = None) -> tuple[int, int, str]:
    """(peak resident bytes of the largest process of `llmkit train <overrides>`, its exit code, its stderr)."""
    cmd = [sys.executable, "-c", _WRAPPER, sys.executable, "-m", "llmkit", "train", *overrides]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", **(env or {})}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    line = next(line for line in result.stdout.splitlines()[::-1] if line.startswith("maxrss"))
    _, rss, code = line.split()
    return int(rss), int(code), result.stderr


def planned(overrides: list[str]):
    """The plan (with its runtime and allocator parts) of `llmkit train <overrides>`."""
    from hydra import compose, initialize_config_module

    from llmkit import plan

    with initialize_config_module(config_module="llmkit.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    setup = plan.setup_from_config(cfg)
    return plan.with_runtime(plan.make_plan(setup), setup)


PARTS = ("runtime", "weights", "gradients", "optimizer", "activations", "working set", "allocator")
HEADER = (f"{'config':22s} " + " ".join(f"{p[:9]:>9}" for p in PARTS)
          + f" {'plan GB':>8} {'measured':>9} {'meas/plan':>9}")


def format_row(name: str, plan, measured: int | None, error: str = "") -> str:
    parts = " ".join(f"{plan.peak.get(p, 0) / GB:9.3f}" for p in PARTS)
    if measured is None:
        return f"{name:22s} {parts} {plan.peak_memory / GB:8.3f}   failed: {error}"
    return f"{name:22s} {parts} {plan.peak_memory / GB:8.3f} {measured / GB:9.3f} {measured / plan.peak_memory:8.3f}x"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default="", help=f"comma-separated names of: {', '.join(CONFIGS)}")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    parser.add_argument("--cache", type=Path, default=None, help="keep the prepared data here between calls")
    args = parser.parse_args(argv)
    chosen = [c for c in args.only.split(",") if c] or DEFAULT
    unknown = sorted(set(chosen) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configuration(s) {', '.join(unknown)}; valid: {', '.join(CONFIGS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(args.cache or Path(tmp) / "cache")
        print(f"{args.steps} training steps per run, vocabulary 2048; figures in GB (1e9 bytes), plan parts per rank")
        print(HEADER, flush=True)
        for name in chosen:
            overrides = train_overrides(CONFIGS[name] + args.set, prepared, Path(tmp) / name, args.steps)
            plan = planned(overrides)
            rss, code, stderr = measure(overrides)
            error = stderr.strip().splitlines()[-1] if code and stderr.strip() else f"exit {code}"
            print(format_row(name, plan, rss if code == 0 else None, error), flush=True)
            rows.append({"name": name, "plan": plan.peak_memory, "measured": rss if code == 0 else None,
                         "phase": plan.peak_phase})
    ratios = [r["measured"] / r["plan"] for r in rows if r["measured"]]
    if ratios:
        print(f"measured / plan: min {min(ratios):.3f}x, max {max(ratios):.3f}x over {len(ratios)} runs")
    return rows


if __name__ == "__main__":
    main()

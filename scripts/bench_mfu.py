"""Benchmark: MFU of gqa_rope at ~350M and ~870M parameters under several training set-ups, side
by side (for a GPU session).

Each variant is one `python train.py` run of --steps steps on the same data; the table
prints the steady-state step time, tokens/s, MFU (from summary.json: 6 x matmul parameters + attention
FLOPs per token against trainer.peak_flops_per_device), peak memory, `llmkit plan`'s estimate of it
(weights, gradients, optimizer, activations; no runtime allowance) and their ratio, and each variant's
MFU ratio against the first. On a GPU the peak is torch.cuda.max_memory_allocated; on the CPU (--smoke)
it is the process's resident set, interpreter and libraries included. Validation is one small pass
at the end so it does not dilute the figures.

  python scripts/bench_mfu.py                         # every variant on one GPU (issue: >= 45% MFU on an H100)
  python scripts/bench_mfu.py --only baseline,batch16 --steps 80
  python scripts/bench_mfu.py --only 1b,1b_fsdp_1gpu --cache data_cache/bench   # split across calls
  python scripts/bench_mfu.py --only 1b --set data.batch_size=12 activation_checkpointing=selective
  python scripts/bench_mfu.py --smoke                 # the same flow on the CPU with a tiny model (for tests)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ~350M parameters: d1024 x 32 layers, 16 heads (64 wide) sharing 2 key/value heads, context 2048
MODEL = ["model=gqa_rope_350m", "data.seq_len=2048"]
# ~870M parameters: d2048 x 20 layers, 16 heads 128 wide (bigger matmuls, flash attention's best head size)
MODEL_1B = ["model=gqa_rope_1b", "data.seq_len=2048"]
GPU = ["trainer=gpu", "compile=true"]
FSDP_1GPU = ["trainer=fsdp", "trainer.devices=1", "compile=true"]
VARIANTS = {  # figures measured on an H100 are in the README (1b: 50.4%, 1b_fsdp_1gpu: 48.8%)
    "baseline": MODEL + GPU + ["data.batch_size=8", "optim.fused=false"],
    "fused_adamw": MODEL + GPU + ["data.batch_size=8", "optim.fused=true"],
    "batch16": MODEL + GPU + ["data.batch_size=16", "optim.fused=true"],
    "batch16_selective_ac": MODEL + GPU + ["data.batch_size=16", "optim.fused=true", "activation_checkpointing=selective"],
    "fsdp_1gpu": MODEL + FSDP_1GPU + ["data.batch_size=8", "optim.fused=false"],
    "fsdp_1gpu_fused": MODEL + FSDP_1GPU + ["data.batch_size=8", "optim.fused=true"],
    "fsdp_1gpu_no_reshard": MODEL + FSDP_1GPU + ["data.batch_size=8", "optim.fused=true",
                                                 "trainer.strategy.reshard_after_forward=never"],
    "fsdp_1gpu_4_blocks_per_unit": MODEL + FSDP_1GPU + ["data.batch_size=8", "optim.fused=true",
                                                        "trainer.strategy.blocks_per_unit=4"],
    "1b": MODEL_1B + GPU + ["data.batch_size=8", "optim.fused=true"],
    "1b_fsdp_1gpu": MODEL_1B + FSDP_1GPU + ["data.batch_size=8", "optim.fused=true"],
}
SMOKE_MODEL = ["model=tiny", "data.seq_len=32", "data.max_bytes=200000", "data.tokenizer=char", "data.split=tail"]
SMOKE_VARIANTS = {
    "baseline": SMOKE_MODEL + ["trainer=cpu", "data.batch_size=4"],
    "batch8": SMOKE_MODEL + ["trainer=cpu", "data.batch_size=8", "optim.fused=true"],
}


def run_variant(name: str, overrides: list[str], steps: int, out: Path, cache: Path) -> dict:
    run_dir = out / name
    cmd = [
        sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}", "data.val_windows=8", "trainer.enable_progress_bar=false",
        "data.progress=false", "sample.max_new_tokens=1", *overrides,
    ]
    env = {**os.environ, "LLMKIT_DATA_DIR": str(cache), "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return {"name": name, "error": last_error_line(result.stderr)}
    return {"name": name, **json.loads((run_dir / "summary.json").read_text()), "plan_bytes": planned_bytes(overrides)}


def planned_bytes(overrides: list[str]) -> int:
    """llmkit plan's memory estimate for the variant, without the fixed runtime allowance."""
    from hydra import compose, initialize_config_module

    from llmkit import plan

    with initialize_config_module(config_module="llmkit.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return plan.make_plan(plan.setup_from_config(cfg)).total_memory


HEADER = (f"{'variant':24s} {'params':>7} {'ms/step':>9} {'tokens/s':>11} {'MFU':>7} {'vs first':>9} {'peak GB':>8} "
          f"{'plan GB':>8} {'plan/peak':>9}")


def format_row(r: dict, first_mfu: float | None) -> str:
    if "error" in r:
        return f"{r['name']:24s} failed: {r['error'][:90]}"
    if r.get("mfu") is None:  # the throughput monitor skips the first (compiling) steps
        return f"{r['name']:24s} no steady-state steps measured: run more --steps"
    ratio = f"{r['mfu'] / first_mfu:8.2f}x" if first_mfu else f"{'':>9}"
    speed = f"{r['median_step_ms']:9.1f} {r['tokens_per_s']:11,.0f} {100 * r['mfu']:6.1f}%"
    memory = f"{r['peak_memory_bytes'] / 1e9:8.2f} {r['plan_bytes'] / 1e9:8.2f} {r['plan_bytes'] / r['peak_memory_bytes']:8.2f}x"
    return f"{r['name']:24s} {r['params'] / 1e6:6.0f}M {speed} {ratio} {memory}"


def last_error_line(stderr: str) -> str:
    """The exception line of a failed run, not the hint lines printed after it."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    return (errors or lines or ["failed"])[-1]


def print_table(rows: list[dict]) -> None:
    print(HEADER)
    first = next((r.get("mfu") for r in rows if r.get("mfu")), None)
    for r in rows:
        print(format_row(r, first))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the flow, not the GPU")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra Hydra overrides for every chosen variant (e.g. data.batch_size=12)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the prepared data here, so split runs (--only ...) prepare it once")
    args = parser.parse_args(argv)
    variants = SMOKE_VARIANTS if args.smoke else VARIANTS
    chosen = [v for v in args.only.split(",") if v] or list(variants)
    unknown = sorted(set(chosen) - set(variants))
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(variants)}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cache = args.cache or out / "cache"
        rows = []
        for name in chosen:  # each row as it finishes: a run cut off by a time limit still reports the rest
            rows.append(run_variant(name, variants[name] + args.set, args.steps, out, cache))
            print(format_row(rows[-1], None), flush=True)
    print(f"{args.steps} steps per variant")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()

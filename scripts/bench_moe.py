"""Benchmark: Mixture of Experts (8 experts, top-2) against the dense FFN, on this machine.

Prints, side by side:
  1. training throughput, dense vs MoE at equal active parameters (MoE experts at half the dense
     hidden size, two per token), measured in this process with interleaved rounds so both see the
     same machine load: tokens/s and the ratio (goal >= 0.6 on CPU);
  2. the MoE layer's dispatch (sort by expert, one grouped matmul or one matmul per expert on its
     slice, un-permute) against a naive masked loop over experts (every expert on every token, masked)
     and against a per-expert gather loop (`torch.where` per expert, as in Hugging Face's Mixtral),
     forward + backward (goal: >= 2x faster than the masked loop);
  3. quality at equal training tokens: `train.py experiment=shakespeare_char_cpu` on char-level
     Tiny Shakespeare, dense and `model/ffn=moe`, same seed and batches, val loss on the whole
     validation split.

  python scripts/bench_moe.py [--steps 600] [--threads N] [--data PATH]

About 5 minutes on 2 CPU cores with the defaults.
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
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import llmkit.model.moe as moe_module  # noqa: E402
from llmkit.model import ModelConfig, Transformer  # noqa: E402
from llmkit.model.init import init_weights  # noqa: E402

VOCAB, BATCH, SEQ = 65, 12, 64  # the shakespeare_char_cpu experiment: char vocabulary, batch 12 x 64
SIZES = dict(vocab_size=VOCAB, d_model=128, n_layers=4, n_heads=4, max_seq_len=SEQ)
DENSE = {"name": "mlp"}
MOE = {"name": "moe", "expert": "mlp", "n_experts": 8, "top_k": 2}  # experts: hidden 2x (dense 4x / top_k)


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, per_round: int, warmup: int = 5) -> dict[str, float]:
    """Median seconds per call of each function, alternating rounds so load changes hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step(ffn: dict) -> tuple[Callable[[], None], Transformer]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SIZES, ffn=ffn)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, VOCAB, (BATCH, SEQ + 1))

    def step() -> None:
        model.loss(data[:, :-1], data[:, 1:]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def active_params(model: Transformer) -> int:
    return model.num_params() - sum(m.inactive_params() for m in model.modules() if hasattr(m, "inactive_params"))


def throughput(rounds: int) -> None:
    (dense_step, dense), (moe_step, moe) = train_step(DENSE), train_step(MOE)
    t = interleaved({"dense": dense_step, "moe": moe_step}, rounds=rounds, per_round=10)
    tokens = BATCH * SEQ
    print(f"\n== 1. training throughput, tiny model (d 128, 4 layers), batch {BATCH} x {SEQ}, same process ==")
    print(f"{'model':34s} {'params':>9s} {'active':>9s} {'ms/step':>8s} {'tok/s':>8s}")
    for label, model, key in (("dense MLP 4x", dense, "dense"), ("MoE 8 experts top-2, MLP 2x each", moe, "moe")):
        print(f"{label:34s} {model.num_params():9d} {active_params(model):9d} {t[key] * 1e3:8.1f} {tokens / t[key]:8.0f}")
    print(f"tokens/s ratio MoE / dense: {t['dense'] / t['moe']:.2f}  (goal >= 0.6)")


def dispatch(tokens: int, rounds: int) -> None:
    torch.manual_seed(0)
    layer = moe_module.MoE(128, n_experts=8, top_k=2, expert="mlp").train()
    init_weights(layer, 0.02, 4)
    experts = layer.experts
    x = torch.randn(tokens, 128, requires_grad=True)

    def ours() -> None:
        layer(x).square().mean().backward()

    def per_expert_matmul() -> None:
        applies = moe_module._grouped_mm_applies
        moe_module._grouped_mm_applies = lambda a, b: False
        try:
            ours()
        finally:
            moe_module._grouped_mm_applies = applies

    def masked() -> None:  # every expert on every token, weighted by a mask of the routing choices
        route = layer.router(x)
        out = torch.zeros_like(x)
        for e in range(8):
            gate = (route.weights * (route.experts == e)).sum(-1, keepdim=True)  # (N, 1), 0 if not chosen
            out = out + gate * (experts.activation(x @ experts.w_in[e]) @ experts.w_out[e])
        out.square().mean().backward()

    def gather_loop() -> None:  # Hugging Face Mixtral style: where() per expert, gather, index_add
        route = layer.router(x)
        out = torch.zeros_like(x)
        for e in range(8):
            token, slot = torch.where(route.experts == e)
            y = experts.activation(x[token] @ experts.w_in[e]) @ experts.w_out[e]
            out = out.index_add(0, token, y * route.weights[token, slot, None])
        out.square().mean().backward()

    fns = {"masked": masked, "gather": gather_loop, "ours_loop": per_expert_matmul}
    grouped = moe_module._grouped_mm_applies(x.detach(), experts.w_in.detach())
    if grouped:
        fns["ours_grouped"] = ours
    t = interleaved(fns, rounds=rounds, per_round=5)
    print(f"\n-- {tokens} tokens x d 128, 8 MLP experts (hidden 256), top-2, forward + backward, medians --")
    labels = {
        "masked": "naive masked loop over experts",
        "gather": "per-expert where/gather loop (HF Mixtral)",
        "ours_loop": "ours: permute, matmul per expert slice",
        "ours_grouped": "ours: permute, one grouped_mm",
    }
    for key, label in labels.items():
        if key in t:
            print(f"{label:44s} {t[key] * 1e3:8.2f} ms   {t['masked'] / t[key]:5.2f}x vs masked")


def full_run(name: str, overrides: list[str], steps: int, data: Path, cache: Path, out: Path) -> dict:
    run_dir = out / name
    cmd = [
        sys.executable, str(ROOT / "train.py"), "experiment=shakespeare_char_cpu", f"data.path={data}",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.enable_progress_bar=false",
        "sample.max_new_tokens=0", f"hydra.run.dir={run_dir}", *overrides,
    ]
    env = {**os.environ, "LLMKIT_DATA_DIR": str(cache)}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((run_dir / "summary.json").read_text())


def quality(steps: int, data: Path) -> None:
    moe = ["model/ffn=moe", "model.ffn.expert=mlp"]
    runs = {
        "dense MLP 4x": [],
        "MoE 8 x MLP 2x, top-2, dropless": moe,
        "MoE ditto, capacity 1.25": [*moe, "model.ffn.capacity_factor=1.25"],
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, overrides) in enumerate(runs.items()):
            results[label] = full_run(f"run{i}", overrides, steps, data, Path(tmp) / "cache", Path(tmp))
    print(f"\n== 3. quality at equal training tokens: Tiny Shakespeare, char, {steps} steps x {BATCH} x {SEQ} tokens ==")
    print(f"{'run (train.py experiment=shakespeare_char_cpu)':48s} {'params':>9s} {'tok/s':>8s} {'val loss':>9s}")
    for label, s in results.items():
        print(f"{label:48s} {s['params']:9d} {s['tokens_per_s']:8.0f} {s['final_val_loss']:9.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps of each quality run")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds of each timing")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads here and in the training runs (1 on a machine others share: "
                             "oversubscribed OpenMP threads stall each other)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the train.py runs
    if not args.data.exists():
        sys.exit(f"no Tiny Shakespeare text at {args.data}; pass --data /path/to/tinyshakespeare.txt")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, grouped_mm: {moe_module._GROUPED_MM is not None}, "
          f"load average {os.getloadavg()[0]:.1f} (other processes share these cores: compare within a section)")
    throughput(args.rounds)
    print("\n== 2. dispatch ==")
    for tokens in (BATCH * SEQ, 8192):
        dispatch(tokens, args.rounds)
    quality(args.steps, args.data)


if __name__ == "__main__":
    main()

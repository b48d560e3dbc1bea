"""Benchmark: host time of a training step's parts, for plain parameters and for FSDP2's DTensor
parameters, side by side:

  1. optimizer step: gradient clipping + AdamW, foreach against fused;
  2. forward + backward: plain against FSDP2 with each reshard_after_forward policy, and with 2 and 4
     blocks per FSDP unit (trainer.strategy.blocks_per_unit);
  3. finding the modules that report auxiliary losses and metrics (MoE): a scan of every module
     with a Protocol isinstance, as each step did before, against the lists the model now keeps.

The model has the layer count of the ~350M gqa_rope of scripts/bench_mfu.py (32 blocks) but tiny
widths, so the arithmetic is negligible and what is measured is the per-module and per-tensor cost
of dispatching a step: work the host must do every step whatever the device, and which leaves a GPU
idle whenever the host is not far enough ahead (on an H100, the 350M model through FSDP2 at batch 8).
FSDP2 runs on a one-rank gloo mesh in this process (an in-memory store: no port, nothing left in
the environment).

  python scripts/bench_host_overhead.py [--layers 32] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from llmkit.distributed import apply_fsdp
from llmkit.lit.optim import adamw
from llmkit.model import ModelConfig, Transformer
from llmkit.model.ffn import AuxLossProvider, MetricsProvider


def build(layers: int, mesh: object | None = None, reshard: str = "default", per_unit: int = 1) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(dict(
        vocab_size=64, d_model=64, n_layers=layers, n_heads=4, max_seq_len=16, norm={"name": "rmsnorm"},
        position={"name": "rope"}, ffn={"name": "swiglu"}, attention={"name": "causal", "n_kv_heads": 2},
    ))
    model = Transformer(cfg)
    if mesh is not None:
        apply_fsdp(model, mesh, reshard_after_forward=reshard, blocks_per_unit=per_unit)
    return model


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))


def time_optimizer(model: Transformer, fused: bool, repeats: int) -> tuple[float, float]:
    """Median milliseconds of clip_grad_norm_ and of optimizer.step."""
    optimizer = adamw(model, fused=fused)
    idx = tokens()
    model.loss(idx, idx).loss.backward()
    params = list(model.parameters())
    clip = median_ms(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0), repeats)
    return clip, median_ms(optimizer.step, repeats)


def time_forward_backward(model: Transformer, repeats: int) -> float:
    idx = tokens()
    return median_ms(lambda: model.loss(idx, idx).loss.backward(), repeats)


def scan_providers(model: Transformer) -> None:
    """What every step did before the model kept its provider lists (two walks, one per Protocol)."""
    [m for m in model.modules() if m is not model and isinstance(m, AuxLossProvider)]
    [m for m in model.modules() if m is not model and isinstance(m, MetricsProvider)]


def optimizer_rows(args: argparse.Namespace, mesh: object) -> list[tuple]:
    rows = []
    for label, fsdp in (("plain", False), ("FSDP2 (DTensor)", True)):
        for fused in (False, True):
            model = build(args.layers, mesh if fsdp else None)
            tensors = len(list(model.parameters()))
            rows.append((label, "fused" if fused else "foreach", tensors, *time_optimizer(model, fused, args.repeats)))
    return rows


def forward_backward_rows(args: argparse.Namespace, mesh: object) -> list[tuple[str, float]]:
    rows = [("plain", time_forward_backward(build(args.layers), args.repeats))]
    for reshard in ("default", "never", "always"):
        model = build(args.layers, mesh, reshard)
        rows.append((f"FSDP2 reshard={reshard}", time_forward_backward(model, args.repeats)))
    for per_unit in (2, 4):
        model = build(args.layers, mesh, per_unit=per_unit)
        rows.append((f"FSDP2 {per_unit} blocks per unit", time_forward_backward(model, args.repeats)))
    return rows


def provider_rows(args: argparse.Namespace) -> list[tuple[str, float]]:
    model = build(args.layers)
    return [
        ("scan every module", median_ms(lambda: scan_providers(model), args.repeats)),
        ("kept lists", median_ms(lambda: (model.pop_aux_losses(), model.pop_metrics()), args.repeats)),
    ]


def main(argv: list[str] | None = None) -> dict[str, list[tuple]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host dispatch cost, not parallel arithmetic
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # in-process: no port, no env
    try:
        mesh = init_device_mesh("cpu", (1,))
        results = {
            "optimizer": optimizer_rows(args, mesh),
            "forward_backward": forward_backward_rows(args, mesh),
            "providers": provider_rows(args),
        }
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)  # a caller in this process (the tests) computes on its own threads again
    print_results(args, results)
    return results


def print_results(args: argparse.Namespace, results: dict[str, list[tuple]]) -> None:
    rows = results["optimizer"]
    baseline = rows[0][3] + rows[0][4]
    print(f"{args.layers} blocks, {rows[0][2]} parameter tensors, medians of {args.repeats} steps (host time)")
    print(f"\n{'parameters':16s} {'AdamW':8s} {'clip ms':>8} {'step ms':>8} {'total ms':>9} {'vs plain foreach':>17}")
    for label, kind, _, clip, step in rows:
        print(f"{label:16s} {kind:8s} {clip:8.2f} {step:8.2f} {clip + step:9.2f} {(clip + step) / baseline:16.2f}x")
    for title, key in (("forward + backward", "forward_backward"), ("finding aux-loss/metrics modules", "providers")):
        first = results[key][0][1]
        print(f"\n{title:26s} {'ms':>8} {'vs first':>9} {'per block':>10}")
        for label, ms in results[key]:
            print(f"{label:26s} {ms:8.2f} {ms / first:8.2f}x {(ms - first) / args.layers:+9.3f}")


if __name__ == "__main__":
    main()

"""Benchmark: host time of one optimizer step (gradient clipping + AdamW) for plain parameters and
for FSDP2's DTensor parameters, with the foreach and the fused AdamW, side by side.

The model has the layer count of the ~350M gqa_rope of scripts/bench_mfu.py (32 blocks) but tiny
widths, so the arithmetic is negligible and what is measured is the
per-tensor cost of dispatching the step: work the host must do every step whatever the device, and
which leaves a GPU idle whenever the host is not far enough ahead. FSDP2 runs on a one-rank gloo
mesh in this process
(an in-memory store: no port, nothing left in the environment).

  python scripts/bench_optimizer.py [--layers 32] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from llmkit.distributed import apply_fsdp
from llmkit.lit.optim import adamw
from llmkit.model import ModelConfig, Transformer


def build(layers: int, mesh: object | None) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(dict(
        vocab_size=64, d_model=64, n_layers=layers, n_heads=4, max_seq_len=16, norm={"name": "rmsnorm"},
        position={"name": "rope"}, ffn={"name": "swiglu"}, attention={"name": "causal", "n_kv_heads": 2},
    ))
    model = Transformer(cfg)
    if mesh is not None:
        apply_fsdp(model, mesh)
    return model


def time_step(model: Transformer, fused: bool, repeats: int) -> tuple[float, float]:
    """Median milliseconds of clip_grad_norm_ and of optimizer.step over `repeats` steps."""
    optimizer = adamw(model, fused=fused)
    idx = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    model.loss(idx, idx).loss.backward()
    params = list(model.parameters())
    clip, step = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        clipped = time.perf_counter()
        optimizer.step()
        clip.append(clipped - start)
        step.append(time.perf_counter() - clipped)
    return 1000 * statistics.median(clip), 1000 * statistics.median(step)


def main(argv: list[str] | None = None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # host dispatch cost, not parallel arithmetic
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # in-process: no port, no env
    try:
        mesh = init_device_mesh("cpu", (1,))
        rows = []
        for label, fsdp in (("plain", False), ("FSDP2 (DTensor)", True)):
            for fused in (False, True):
                model = build(args.layers, mesh if fsdp else None)
                tensors = len(list(model.parameters()))
                rows.append((label, "fused" if fused else "foreach", tensors, *time_step(model, fused, args.repeats)))
    finally:
        dist.destroy_process_group()
    baseline = rows[0][3] + rows[0][4]
    print(f"{args.layers} blocks, {rows[0][2]} parameter tensors, medians of {args.repeats} steps (host time)")
    print(f"{'parameters':16s} {'AdamW':8s} {'clip ms':>8} {'step ms':>8} {'total ms':>9} {'vs plain foreach':>17}")
    for label, kind, _, clip, step in rows:
        print(f"{label:16s} {kind:8s} {clip:8.2f} {step:8.2f} {clip + step:9.2f} {(clip + step) / baseline:16.2f}x")
    return rows


if __name__ == "__main__":
    main()

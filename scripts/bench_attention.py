"""Benchmark: attention kernels on the same inputs, forward + backward, against the eager reference.

  python scripts/bench_attention.py [--device cuda] [--dtype bf16] [--seq 1024] [--batch 8]

For each case (MHA, GQA, sliding window, ALiBi bias) it prints every kernel's time per
forward+backward, its speed-up over eager, and the largest difference from eager's output.
"""

from __future__ import annotations

import argparse
import time

import torch

from llmkit.model.kernels import KERNELS
from llmkit.model.positions import POSITIONS

CASES = {
    "mha": dict(n_kv=16, window=None, position="none"),
    "gqa 16q/4kv": dict(n_kv=4, window=None, position="none"),
    "window 256": dict(n_kv=16, window=256, position="none"),
    "alibi": dict(n_kv=16, window=None, position="alibi"),
}


def timed(fn, device: str, repeats: int) -> float:
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def run_case(name: str, case: dict, args: argparse.Namespace, dtype: torch.dtype) -> None:
    B, H, T, D = args.batch, 16, args.seq, 64
    gen = torch.Generator(device=args.device).manual_seed(0)
    make = lambda h: torch.randn(B, h, T, D, device=args.device, dtype=dtype, generator=gen, requires_grad=True)
    q, k, v = make(H), make(case["n_kv"]), make(case["n_kv"])
    pos = torch.arange(T, device=args.device)
    ctx = POSITIONS.build(case["position"], n_heads=H).to(args.device).context(pos, pos)
    reference = None
    baseline = None
    for kernel_name in args.kernels:
        kernel = KERNELS.get(kernel_name)

        def step(kernel=kernel) -> torch.Tensor:
            out = kernel(q, k, v, ctx, case["window"], 0.0)
            out.float().square().mean().backward()
            return out

        try:
            out = step().detach().float()
            seconds = timed(step, args.device, args.repeats)
        except (NotImplementedError, RuntimeError, ImportError) as err:
            print(f"  {kernel_name:9s} unavailable: {str(err).splitlines()[0][:90]}")
            continue
        if reference is None:
            reference, baseline = out, seconds
        diff = (out - reference).abs().max().item()
        speedup = baseline / seconds
        print(f"  {kernel_name:9s} {seconds * 1000:9.2f} ms  {speedup:6.2f}x vs {args.kernels[0]}  max|diff| {diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=["fp32", "bf16"])
    parser.add_argument("--seq", type=int, default=1024 if torch.cuda.is_available() else 256)
    parser.add_argument("--batch", type=int, default=8 if torch.cuda.is_available() else 2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kernels", nargs="+", default=["eager", "sdpa", "flex", "xformers"])
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), "
          f"dtype {args.dtype}, B={args.batch} H=16 T={args.seq} D=64, forward+backward")
    for name, case in CASES.items():
        print(name)
        run_case(name, case, args, dtype)


if __name__ == "__main__":
    main()

"""Benchmark: generation tokens/s with and without the KV cache, side by side in one process.

  python scripts/bench_generate.py [--device cuda] [--contexts 128 512] [--new-tokens 64] [--threads 1]
                                   [--d-model 512 --n-layers 8 --n-heads 8 --n-kv-heads 2 --position rope]

For each context length C it decodes `--new-tokens` tokens greedily after a random C-token prompt,
once recomputing the whole context every step and once with the cache, on a model of the tiny
preset's sizes unless told otherwise (randomly initialised: speed does not depend on the weights).
The time includes the prefill. It prints tokens/s of each, the speed-up, and whether both produced
the same tokens. A model this small is bound by per-operation overhead, not arithmetic, on a GPU:
there both ways run at about the same speed, and the cache pays off with larger models.
"""

from __future__ import annotations

import argparse
import time

import torch

from llmkit.generation import generate
from llmkit.model import ModelConfig, Transformer


def timed(model: Transformer, prompt: list[int], new_tokens: int, cache: bool, repeats: int) -> tuple[float, list[int]]:
    """Best wall time of `repeats` runs (after one warm-up), and the tokens."""
    generate(model, [prompt], 4, temperature=0, cache=cache)
    best, tokens = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = generate(model, [prompt], new_tokens, temperature=0, cache=cache)[0]  # .tolist() syncs CUDA
        best = min(best, time.perf_counter() - start)
    return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--position", default="learned", help="position scheme (the tiny preset's is learned)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--n-kv-heads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=2048, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
        max_seq_len=max(640, max(args.contexts) + args.new_tokens),
        position={"name": args.position}, attention={"name": "causal", "n_kv_heads": args.n_kv_heads},
    )
    model = Transformer(cfg).to(args.device).eval()
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"device {args.device} ({name}), torch {torch.__version__}, fp32, batch 1, greedy, {args.new_tokens} new tokens, "
        f"best of {args.repeats}\nmodel: d_model={cfg.d_model} n_layers={cfg.n_layers} n_heads={cfg.n_heads} "
        f"vocab={cfg.vocab_size} position={args.position} ({model.num_params() / 1e6:.2f}M params); time includes the prefill"
    )
    print(f"{'context':>8} {'no cache tok/s':>15} {'cache tok/s':>12} {'speed-up':>9}  same tokens")
    for context in args.contexts:
        prompt = torch.randint(0, cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(context)).tolist()
        full_s, full_tokens = timed(model, prompt, args.new_tokens, cache=False, repeats=args.repeats)
        cached_s, cached_tokens = timed(model, prompt, args.new_tokens, cache=True, repeats=args.repeats)
        full_tps, cached_tps = args.new_tokens / full_s, args.new_tokens / cached_s
        same = "yes" if full_tokens == cached_tokens else "NO"
        print(f"{context:8d} {full_tps:15.1f} {cached_tps:12.1f} {cached_tps / full_tps:8.1f}x  {same}")


if __name__ == "__main__":
    main()

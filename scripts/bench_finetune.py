"""Benchmark: LoRA against full fine-tuning, and SFT packing against padding, side by side in one run.

  python scripts/bench_finetune.py [--steps 10] [--threads N] [--d-model 512 --n-layers 8 --vocab 8192]

1. Full vs LoRA on a ~25M-parameter model (d_model 512, 8 layers, 8 heads; random weights: speed and
   memory do not depend on them): the median optimizer-step time (forward, backward, AdamW) at batch
   8 x 256 tokens, and the bytes of gradients plus AdamW state after a step. LoRA: r=8 on the attention
   projections (the finetune=lora default). Goals: LoRA step time <= 0.7x full, bytes <= 5% of full.
2. Packing vs padding: 512 SFT samples of mixed lengths (16 to 256 tokens, a third of each scored; lengths
   uniform, and log-uniform as chat data has them) through a smaller model (d_model 256, 4 layers), once
   packed best-fit-decreasing into 256-token rows and once one sample per padded row: scored tokens per
   second of training. The speed-up is bounded by the fill of padded rows. Goal: packing >= 2x.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import time

import torch

from llmkit.adapters.lora import LoraConfig, apply_lora
from llmkit.lit.optim import adamw
from llmkit.model import ModelConfig, Transformer
from llmkit.posttrain.packing import pack
from llmkit.text.chat import Rendered


class Stepper:
    """One model's optimizer steps; the gradient + AdamW-state bytes are read after the first."""

    def __init__(self, model: Transformer, batch: tuple[torch.Tensor, ...]) -> None:
        self.model, self.batch = model, batch
        self.optimizer = adamw(model, lr=1e-4)
        self.times: list[float] = []
        self.bytes = 0

    def step(self, timed: bool) -> None:
        start = time.perf_counter()
        self.model.loss(*self.batch).loss.backward()
        self.optimizer.step()
        if not self.bytes:  # AdamW's state exists after the first step; the gradients are still there
            grads = sum(p.grad.numel() * p.grad.element_size() for p in self.model.parameters() if p.grad is not None)
            state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                        if torch.is_tensor(t) and t.dim() > 0)
            self.bytes = grads + state
        self.optimizer.zero_grad(set_to_none=True)
        if timed:
            self.times.append(time.perf_counter() - start)


def full_vs_lora(args: argparse.Namespace) -> None:
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=8,
                      max_seq_len=256)
    torch.manual_seed(0)
    full_model = Transformer(cfg)
    lora_model = copy.deepcopy(full_model)
    apply_lora(lora_model, LoraConfig(r=8))
    ids = torch.randint(0, cfg.vocab_size, (8, 257))
    batch = (ids[:, :-1], ids[:, 1:])
    print(f"model: {full_model.num_params() / 1e6:.1f}M parameters; batch 8 x 256 tokens; {args.steps} timed steps each, "
          "alternating (so a busy machine slows both alike)")
    full, lora = Stepper(full_model, batch), Stepper(lora_model, batch)
    for i in range(args.steps + 2):  # two warm-up steps each
        full.step(timed=i >= 2)
        lora.step(timed=i >= 2)
    full_s, lora_s = statistics.median(full.times), statistics.median(lora.times)
    trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    print(f"{'':<6}{'step ms':>10}{'grad+AdamW MB':>16}{'trainable':>12}")
    print(f"{'full':<6}{full_s * 1e3:>10.1f}{full.bytes / 1e6:>16.2f}{full_model.num_params():>12,}")
    print(f"{'lora':<6}{lora_s * 1e3:>10.1f}{lora.bytes / 1e6:>16.2f}{trainable:>12,}")
    print(f"LoRA / full: step time {lora_s / full_s:.2f}x (goal <= 0.7x), gradient + optimizer bytes "
          f"{lora.bytes / full.bytes:.2%} (goal <= 5%)")


def mixed_samples(n: int, context: int, vocab: int, spread: str) -> list[Rendered]:
    """uniform: lengths uniform in [16, context]; log-uniform: uniform in log length (many short samples,
    a few long ones: the shape of chat data)."""
    rng = random.Random(0)
    samples = []
    for _ in range(n):
        if spread == "uniform":
            length = rng.randint(16, context)
        else:
            length = int(round(math.exp(rng.uniform(math.log(16), math.log(context)))))
        ids = [rng.randrange(vocab) for _ in range(length)]
        answer = length - length // 3  # the last third is the reply
        labels = [ids[i + 1] if i + 1 >= answer else -100 for i in range(length - 1)] + [-100]
        samples.append(Rendered(ids, labels))
    return samples


def scored_tokens_per_s(model: Transformer, rows, batch_size: int) -> tuple[float, int]:
    optimizer = adamw(model, lr=1e-4)
    tensors = [torch.from_numpy(getattr(rows, n)) for n in ("ids", "labels", "positions", "segments")]
    scored = int((tensors[1] != -100).sum())
    start = time.perf_counter()
    for i in range(0, tensors[0].size(0), batch_size):
        model.loss(*(t[i : i + batch_size] for t in tensors)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return scored / (time.perf_counter() - start), tensors[0].size(0)


def packing_vs_padding(args: argparse.Namespace) -> None:
    context = 256
    cfg = ModelConfig(vocab_size=args.vocab, d_model=256, n_layers=4, n_heads=4, max_seq_len=context)
    print(f"\n512 SFT samples of 16-256 tokens, context {context}, batch 8 rows (d_model 256, 4 layers)")
    for spread in ("uniform", "log-uniform"):
        samples = mixed_samples(512, context, cfg.vocab_size, spread)
        results = {}
        for packing in (True, False):
            torch.manual_seed(0)
            rows = pack(samples, context, packing=packing)
            results[packing] = (*scored_tokens_per_s(Transformer(cfg), rows, batch_size=8), rows.fill)
        for packing, (rate, n_rows, fill) in results.items():
            print(f"{spread:<12}{'packed' if packing else 'padded':<8}{n_rows:>6} rows ({fill:.0%} filled)"
                  f"{rate:>10,.0f} scored tokens/s")
        print(f"{spread}: packing / padding {results[True][0] / results[False][0]:.2f}x (goal >= 2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--packing-only", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.packing_only:
        full_vs_lora(args)
    packing_vs_padding(args)


if __name__ == "__main__":
    main()

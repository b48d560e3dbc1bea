"""Benchmark: LoRA against full fine-tuning, and SFT packing against padding, side by side in one run.

  python scripts/bench_finetune.py [--steps 10] [--threads N] [--d-model 512 --n-layers 8 --vocab 8192]
                                   [--qlora-only | --speed-only] [--no-compile]

1. Full vs LoRA on a ~25M-parameter model (d_model 512, 8 layers, 8 heads; random weights: speed and
   memory do not depend on them): the median optimizer-step time (forward, backward, AdamW) at batch
   8 x 256 tokens, and the bytes of gradients plus AdamW state after a step. LoRA: r=8 on the attention
   projections (the finetune=lora default). Goals: LoRA step time <= 0.7x full, bytes <= 5% of full.
2. Packing vs padding: 512 SFT samples of mixed lengths (16 to 256 tokens, a third of each scored; lengths
   uniform, and log-uniform as chat data has them) through a smaller model (d_model 256, 4 layers), once
   packed best-fit-decreasing into 256-token rows and once one sample per padded row: scored tokens per
   second of training. The speed-up is bounded by the fill of padded rows. Goal: packing >= 2x.
3. QLoRA (NF4, block 64, double quantization) vs LoRA fp32 on a Llama-style model of section 1's size and on
   a ~350M one (d_model 1024, 24 layers, vocab 32000) built on the meta device and materialised block by
   block: the frozen base's resident bytes (goal <= 0.3x) and the peak RSS of one AdamW step, each in a fresh
   process; then seconds per step, interleaved in one process: llmkit LoRA, llmkit QLoRA, peft LoRA on the
   transformers export of the same model (same targets q, k, v, o, r, batch, sequence; goal llmkit >= 1.3x
   faster) and peft + bitsandbytes 4-bit (reported if its CPU backend runs). `--qlora-only` runs this alone,
   `--speed-only` its step times alone. One more row, `llmkit lora compiled`, is the LoRA model with each block
   torch.compile'd as `llmkit train finetune=lora compile=true` does (`--no-compile` leaves it out); peft runs
   eager. Both sides fp32 with the same targets, r, alpha, batch and sequence; one difference is structural:
   llmkit's fused wqkv takes one adapter (q, k, v share A: r x d_model fewer A rows to train and multiply),
   where peft adapts q_proj, k_proj and v_proj apart (llmkit/adapters/lora.py; the export repeats A, exactly).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import time

import torch
from torch import nn

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

    def loss(self) -> torch.Tensor:
        return self.model.loss(*self.batch).loss

    def step(self, timed: bool) -> None:
        start = time.perf_counter()
        self.loss().backward()
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


# ---- 3. QLoRA ---------------------------------------------------------------------------------------------
# Llama-style, so that the same model exports to transformers for peft (tied head: ~29M parameters at
# d_model 512 x 8 layers x vocab 8192, the size of section 1's model; MHA: peft's q/k/v match one to one)
LLAMA = dict(norm={"name": "rmsnorm", "eps": 1e-6}, position={"name": "rope", "theta": 10000.0},
             ffn={"name": "swiglu", "hidden_mult": 8 / 3, "multiple_of": 32}, attention={"name": "causal"})
TARGETS = ["blocks.*.attention.wqkv", "blocks.*.attention.wo"]  # finetune=lora / qlora's default targets


def llama(vocab: int, d_model: int, n_layers: int, n_heads: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, max_seq_len=256, **LLAMA)


def block_by_block(cfg: ModelConfig, quantized: bool) -> Transformer:
    """The model's structure on the meta device; the embeddings, norm and head, then one block at a time,
    materialised on the CPU, LoRA-adapted and (quantized=True) quantized before the next: the process never
    holds more than one block's fp32 weights beyond what it keeps."""
    from dataclasses import replace

    from llmkit.adapters.qlora import QuantConfig, quantize_linears
    from llmkit.model.init import init_weights

    with torch.device("meta"):
        model = Transformer(cfg)
    outer = Transformer(replace(cfg, n_layers=1))  # embeddings, positions, final norm, head, on the CPU
    for name in ("tok_emb", "position", "norm", "head"):
        setattr(model, name, getattr(outer, name))
    for i in range(cfg.n_layers):
        block = outer._block(i)
        init_weights(block, cfg.init_std, cfg.n_layers)
        apply_lora(block, LoraConfig(r=8, targets=[t.removeprefix("blocks.*.") for t in TARGETS]))
        if quantized:
            quantize_linears(block, QuantConfig(quantize=["*"]))
        model.blocks[i] = block
    del outer
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("lora_A", "lora_B")))
    return model


def frozen_and_adapter_bytes(model: nn.Module) -> tuple[int, int]:
    from llmkit.adapters.qlora import resident_bytes

    adapters = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return resident_bytes(model) - adapters, adapters


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def memory_worker(cfg: ModelConfig, quantized: bool, batch: tuple[int, int], queue) -> None:
    """In a fresh process: the frozen base's bytes, RSS after building, peak RSS over one training step."""
    import resource

    torch.manual_seed(0)
    start_rss = _rss_mb()
    model = block_by_block(cfg, quantized)
    frozen, adapters = frozen_and_adapter_bytes(model)
    built_rss = _rss_mb()
    ids = torch.randint(0, cfg.vocab_size, (batch[0], batch[1] + 1))
    optimizer = adamw(model, lr=1e-4)
    start = time.perf_counter()
    model.loss(ids[:, :-1], ids[:, 1:]).loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    queue.put(dict(frozen=frozen, adapters=adapters, start_rss=start_rss, built_rss=built_rss, peak_rss=peak, step_s=seconds))


def measured_apart(cfg: ModelConfig, quantized: bool, batch: tuple[int, int]) -> dict:
    import multiprocessing as mp

    context = mp.get_context("spawn")  # a clean process: ru_maxrss is its own peak, not this one's
    queue = context.Queue()
    worker = context.Process(target=memory_worker, args=(cfg, quantized, batch, queue))
    worker.start()
    worker.join()
    if worker.exitcode != 0:
        raise RuntimeError(f"the measuring process failed (exit code {worker.exitcode}); its traceback is above")
    return queue.get(timeout=10)


def qlora_memory(args: argparse.Namespace) -> None:
    sizes = [("bench", llama(args.vocab, args.d_model, args.n_layers, 8), (8, 256)),
             ("~350M", llama(32000, 1024, args.large_layers, 16), (1, 256))]
    print("\nQLoRA NF4 (block 64, double quantization) vs LoRA fp32: the frozen base's resident bytes (NF4 codes,"
          " scales, and the fp32 embeddings, norms and tied head), each measured in a fresh process; peak RSS "
          "over one AdamW step")
    print(f"{'model':<8}{'':<7}{'params':>9}{'frozen MB':>11}{'adapters MB':>13}{'RSS built MB':>14}{'peak RSS MB':>13}"
          f"{'step s':>8}")
    for label, cfg, batch in sizes:
        with torch.device("meta"):
            params = Transformer(cfg).num_params()  # the structure alone: nothing allocated
        results = {}
        for quantized in (False, True):
            r = results[quantized] = measured_apart(cfg, quantized, batch)
            print(f"{label:<8}{'qlora' if quantized else 'lora':<7}{params / 1e6:>8.1f}M{r['frozen'] / 1e6:>11.1f}"
                  f"{r['adapters'] / 1e6:>13.2f}{r['built_rss']:>14.0f}{r['peak_rss']:>13.0f}{r['step_s']:>8.2f}")
        lora, qlora = results[False], results[True]
        print(f"{label}: frozen base QLoRA / LoRA {qlora['frozen'] / lora['frozen']:.3f}x (goal <= 0.3x); peak RSS of a "
              f"step (batch {batch[0]} x {batch[1]}) {qlora['peak_rss'] / lora['peak_rss']:.2f}x; process start "
              f"{lora['start_rss']:.0f} MB (torch imported)")


class PeftStepper(Stepper):
    """The same step on a transformers model wrapped by peft (labels shift inside the model)."""

    def loss(self) -> torch.Tensor:
        ids = self.batch[0]
        return self.model(input_ids=ids, labels=ids).loss


def hf_adapted(model: Transformer, where: str, four_bit: bool) -> nn.Module:
    import peft
    import transformers

    from llmkit.hf import export_hf

    export_hf(model, None, where)
    extra = {}
    if four_bit:  # peft + bitsandbytes: the same NF4 + double quantization, compute in fp32
        extra = dict(device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    hf = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return peft.get_peft_model(hf, config).train()


def qlora_speed(args: argparse.Namespace) -> None:
    import tempfile

    from llmkit.adapters.qlora import QuantConfig, apply_qlora
    from llmkit.distributed import apply_compile

    cfg = llama(args.vocab, args.d_model, args.n_layers, 8)
    torch.manual_seed(0)
    base = Transformer(cfg)
    lora_model, qlora_model = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(lora_model, LoraConfig(r=8, targets=TARGETS))
    apply_qlora(qlora_model, LoraConfig(r=8, targets=TARGETS), QuantConfig())
    ids = torch.randint(0, cfg.vocab_size, (8, 257))
    batch = (ids[:, :-1], ids[:, 1:])
    steppers = {"llmkit lora": Stepper(lora_model, batch), "llmkit qlora": Stepper(qlora_model, batch)}
    if args.compile:  # what `llmkit train finetune=lora compile=true` runs: LoRA applied, then each block compiled
        compiled = copy.deepcopy(lora_model)
        apply_compile(compiled)
        steppers["llmkit lora compiled"] = Stepper(compiled, batch)
        start = time.perf_counter()
        steppers["llmkit lora compiled"].step(timed=False)
        print(f"llmkit lora compiled: compiling the blocks and the first step took {time.perf_counter() - start:.0f} s")
    with tempfile.TemporaryDirectory() as tmp:
        for name, four_bit in (("peft lora", False), ("peft+bnb 4bit", True)):
            try:
                steppers[name] = PeftStepper(hf_adapted(base, f"{tmp}/{name.replace(' ', '_')}", four_bit), batch)
                steppers[name].step(timed=False)  # fails here if the backend cannot run
            except Exception as err:  # report either way: bitsandbytes' CPU backend may be missing
                steppers.pop(name, None)
                print(f"{name}: did not run here: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        print(f"\nstep time, {base.num_params() / 1e6:.1f}M-parameter llama-style model, r=8 on q, k, v, o; batch 8 x 256; "
              f"fp32; {args.steps} timed steps each, interleaved (median, and the least disturbed step: min)")
        for i in range(args.steps + 1):  # one more warm-up step each
            for stepper in steppers.values():
                stepper.step(timed=i >= 1)
    times = {name: statistics.median(s.times) for name, s in steppers.items()}
    for name, seconds in times.items():
        print(f"{name:<22}{seconds * 1e3:>10.1f} ms/step{min(steppers[name].times) * 1e3:>10.1f} min")
    print(f"QLoRA / LoRA (llmkit): {times['llmkit qlora'] / times['llmkit lora']:.2f}x step time (dequantization per matmul)")
    for ours in ("llmkit lora", "llmkit lora compiled"):
        if "peft lora" in times and ours in times:
            fastest = min(steppers["peft lora"].times) / min(steppers[ours].times)
            print(f"peft / {ours}: {times['peft lora'] / times[ours]:.2f}x median, {fastest:.2f}x min (goal >= 1.3x)")
    if "peft+bnb 4bit" in times:
        print(f"peft+bitsandbytes / llmkit, QLoRA: {times['peft+bnb 4bit'] / times['llmkit qlora']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--packing-only", action="store_true")
    parser.add_argument("--qlora-only", action="store_true", help="section 3 alone (QLoRA memory and speed)")
    parser.add_argument("--large-layers", type=int, default=24, help="layers of the ~350M model (d_model 1024)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="leave out the `compile=true` row of section 3 (compiling takes a minute on 2 cores)")
    parser.add_argument("--speed-only", action="store_true", help="section 3's step times alone (no memory runs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.qlora_only or args.speed_only:
        if not args.speed_only:
            qlora_memory(args)
        qlora_speed(args)
        return
    if not args.packing_only:
        full_vs_lora(args)
    packing_vs_padding(args)
    if not args.packing_only:
        qlora_memory(args)
        qlora_speed(args)


if __name__ == "__main__":
    main()

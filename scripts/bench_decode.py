"""Benchmark: greedy decode tokens/s of one model on every engine, side by side in one run.

  python scripts/bench_decode.py [--batch 1 16] [--new-tokens 128] [--prompt 16] [--repeat 3] [--threads 2]
                                 [--size 25m|tiny] [--engines llmkit ...]

One Llama-style model (RoPE, GQA off, RMSNorm, SwiGLU; 25m: d_model 512, 8 layers, 8 heads, vocab 8192; random
weights, speed does not depend on them) with a BPE tokenizer trained on the benchmark text, exported once to
Hugging Face (llmkit/hf.py) and to ONNX (llmkit/onnx.py), then decoded greedily by:

  llmkit fp32 / int8          llmkit.generation.generate with the KV cache (int8: llmkit/quantize.py, dynamic backend)
  llmkit-onnx fp32/int8/q4    the same loop over llmkit's ONNX export on onnxruntime (quantize=int8, q4: MatMulNBits)
  transformers fp32           AutoModelForCausalLM.generate on the HF export
  ct2 float32 / int8          CTranslate2's converter on the HF export, Generator.generate_batch (token strings)

Every engine generates exactly --new-tokens tokens per row (no end-of-sequence stop) from the same prompts;
tokens/s = rows x new tokens / wall seconds, best of --repeat, all engines with the same number of threads.
The last lines give ratios against the fastest peer (transformers, CTranslate2) of the same precision.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmkit.generation import generate  # noqa: E402
from llmkit.hf import export_hf  # noqa: E402
from llmkit.model import ModelConfig, Transformer  # noqa: E402
from llmkit.onnx import OnnxDecoder, export_onnx, load_onnx  # noqa: E402
from llmkit.quantize import quantize_model  # noqa: E402
from llmkit.text.tokenizer import train_tokenizer  # noqa: E402

SIZES = {"tiny": dict(d_model=128, n_layers=4, n_heads=4), "25m": dict(d_model=512, n_layers=8, n_heads=8)}


def build(size: str, vocab: int, text: str) -> tuple[Transformer, object]:
    tokenizer = train_tokenizer("bpe", [text], vocab)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, max_seq_len=512, position={"name": "rope"},
                      norm={"name": "rmsnorm"}, ffn={"name": "swiglu"}, tie_embeddings=False, **SIZES[size])
    torch.manual_seed(0)
    return Transformer(cfg).eval(), tokenizer


def timed(run: Callable[[], int], repeat: int) -> float:
    """Best tokens/s of `repeat` runs (the first run also warms up)."""
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        tokens = run()
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def llmkit_engine(model: Transformer, prompts: list[list[int]], n: int) -> Callable[[], int]:
    return lambda: sum(map(len, generate(model, prompts, n, temperature=0)))


def onnx_engine(directory: Path, prompts: list[list[int]], n: int, threads: int) -> Callable[[], int]:
    exported = load_onnx(directory, threads=threads)
    return lambda: sum(map(len, generate(exported, prompts, n, temperature=0, decoder=OnnxDecoder(exported))))


def transformers_engine(hf_dir: Path, prompts: list[list[int]], n: int) -> Callable[[], int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)  # every prompt has the same length: no padding needed

    def run() -> int:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        return (out.size(1) - ids.size(1)) * out.size(0)

    return run


def ct2_engine(hf_dir: Path, out: Path, quantization: str, prompts: list[list[int]], n: int, threads: int) -> Callable[[], int]:
    import ctranslate2

    if not out.exists():
        converter = Path(sys.executable).parent / "ct2-transformers-converter"
        subprocess.run([str(converter), "--model", str(hf_dir), "--output_dir", str(out), "--quantization", quantization],
                       check=True, capture_output=True)
    generator = ctranslate2.Generator(str(out), device="cpu", compute_type=quantization, intra_threads=threads)
    vocab = [line.rstrip("\n") for line in (out / "vocabulary.txt").read_text(encoding="utf-8").splitlines()] \
        if (out / "vocabulary.txt").exists() else None
    if vocab is None:
        import json

        vocab = json.loads((out / "vocabulary.json").read_text())
    tokens = [[vocab[i] for i in p] for p in prompts]  # generate_batch takes token strings, not ids

    def run() -> int:
        results = generator.generate_batch(tokens, max_length=n, min_length=n, sampling_topk=1,
                                           include_prompt_in_result=False, end_token=[])
        return sum(len(r.sequences_ids[0]) for r in results)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", choices=sorted(SIZES), default="25m")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    parser.add_argument("--engines", nargs="+", default=["llmkit", "llmkit-int8", "llmkit-onnx", "llmkit-onnx-int8",
                                                         "llmkit-onnx-q4", "transformers", "ct2-float32", "ct2-int8"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    fallback = (argparse, copy, subprocess)  # Python's own sources, on a machine without the benchmark text
    text = args.text.read_text() if args.text.exists() else "\n".join(Path(m.__file__).read_text() for m in fallback)
    model, tokenizer = build(args.size, args.vocab, text)
    params = sum(p.numel() for p in model.blocks.parameters())
    print(f"model: {args.size} ({params / 1e6:.1f}M parameters in the blocks, vocab {model.cfg.vocab_size}), "
          f"prompt {args.prompt}, {args.new_tokens} new tokens, greedy, {args.threads} threads, best of {args.repeat}")
    work = Path(tempfile.mkdtemp(prefix="bench_decode_"))
    hf_dir = export_hf(model, tokenizer, work / "hf")
    g = torch.Generator().manual_seed(0)
    results: dict[str, dict[int, float]] = {}
    for batch in args.batch:
        prompts = torch.randint(3, model.cfg.vocab_size, (batch, args.prompt), generator=g).tolist()
        engines = engine_factories(model, hf_dir, work, prompts, args)
        for name in args.engines:
            try:
                rate = timed(engines[name](), args.repeat)
            except Exception as err:  # an engine missing here is reported, not fatal
                print(f"  {name:18s} batch {batch:3d}: unavailable ({type(err).__name__}: {str(err)[:120]})")
                continue
            results.setdefault(name, {})[batch] = rate
            print(f"  {name:18s} batch {batch:3d}: {rate:9.1f} tokens/s", flush=True)
    report(results, args.batch)


def engine_factories(model: Transformer, hf_dir: Path, work: Path, prompts: list[list[int]],
                     args: argparse.Namespace) -> dict[str, Callable[[], Callable[[], int]]]:
    """name -> what sets the engine up (not timed) and returns its timed run."""
    n, threads = args.new_tokens, args.threads
    return {
        "llmkit": lambda: llmkit_engine(model, prompts, n),
        "llmkit-int8": lambda: llmkit_engine(quantize_model(copy.deepcopy(model), "dynamic"), prompts, n),
        "llmkit-onnx": lambda: onnx_engine(_onnx(model, work, None), prompts, n, threads),
        "llmkit-onnx-int8": lambda: onnx_engine(_onnx(model, work, "int8"), prompts, n, threads),
        "llmkit-onnx-q4": lambda: onnx_engine(_onnx(model, work, "q4"), prompts, n, threads),
        "transformers": lambda: transformers_engine(hf_dir, prompts, n),
        "ct2-float32": lambda: ct2_engine(hf_dir, work / "ct2-float32", "float32", prompts, n, threads),
        "ct2-int8": lambda: ct2_engine(hf_dir, work / "ct2-int8", "int8", prompts, n, threads),
    }


def _onnx(model: Transformer, work: Path, quantize: str | None) -> Path:
    out = work / f"onnx-{quantize or 'fp32'}"
    if not out.exists():
        export_onnx(model, None, out, quantize)
    return out


def report(results: dict[str, dict[int, float]], batches: list[int]) -> None:
    print("\n| engine | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for name, rates in results.items():
        print(f"| {name} | " + " | ".join(f"{rates.get(b, float('nan')):.1f}" for b in batches) + " |")
    groups = {"fp32": (["llmkit", "llmkit-onnx"], ["transformers", "ct2-float32"]),
              "int8": (["llmkit-int8", "llmkit-onnx-int8"], ["ct2-int8"])}
    for precision, (ours, peers) in groups.items():
        for b in batches:
            best_ours = max(((results[e][b], e) for e in ours if b in results.get(e, {})), default=None)
            best_peer = max(((results[e][b], e) for e in peers if b in results.get(e, {})), default=None)
            if best_ours and best_peer:
                print(f"{precision} batch {b}: llmkit's best ({best_ours[1]}) / fastest peer ({best_peer[1]}) = "
                      f"{best_ours[0] / best_peer[0]:.2f}x")
    for b in batches:
        if b in results.get("transformers", {}) and b in results.get("llmkit", {}):
            print(f"batch {b}: llmkit fp32 / transformers = {results['llmkit'][b] / results['transformers'][b]:.2f}x")


if __name__ == "__main__":
    main()

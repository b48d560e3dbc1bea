"""Benchmark: seconds per GRPO step, llmkit (`llmkit train task=grpo`) vs TRL's GRPOTrainer (no vLLM), side by
side in one process on the same model, prompts, group size, completion length and batch; and the rollout's
decode speed against `llmkit serve`'s engine on the same rows.

  python scripts/bench_rl.py [--prompts 4] [--generations 8] [--completion 32] [--prompt-length 32] [--steps 11]
                             [--model tiny] [--repeats 2] [--threads N] [--log-every 5]

The model is random (speed does not depend on the weights) with a one-character-per-token vocabulary, so
that llmkit's tokenizer and the Hugging Face one built for TRL give the same ids; TRL trains the model
exported with llmkit/hf.py. The reward is a function of the completion text (its length mod 3), so
groups have unequal rewards. Both runs: beta=0 (no reference), num_iterations=1, loss_type=dapo, each
trainer's default optimizer (fused AdamW for both), temperature 1, one process, the threads torch has, no
gradient clipping, logs written every --log-every steps. Per step, timed by each trainer's callbacks from a
step's start to its end: rollout (generation + scoring) and update (everything else: forward, backward,
optimizer step, the trainer's own work), means over the steps after the first; each trainer runs --repeats
times, alternated, and its fastest run is shown (the machines these run on are shared: the fastest run is
the one least slowed by other load).

Rollout tokens/s: llmkit's rollout sampler (llmkit/generation/groups.py: all rows in one batch through
the KV-cache decoder, each prompt prefilled once) vs the serving engine (llmkit/serve/engine.py: every
row submitted at once, max_batch = rows), the same prompts, max_tokens and sampling, no stop token, in the same process.
And a rollout whose rows stop early (each with a 5% chance per token): stopped rows leaving the decoding batch
(llmkit's default) against every row decoded to the end (as Hugging Face's generate does).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

MODELS = {
    "tiny": dict(vocab_size=514, d_model=128, n_layers=4, n_heads=4, max_seq_len=256),
    "micro": dict(vocab_size=514, d_model=8, n_layers=4, n_heads=2, max_seq_len=256),
    "small": dict(vocab_size=514, d_model=256, n_layers=6, n_heads=8, max_seq_len=256),
}
CHARS = "".join(chr(0x4E00 + i) for i in range(512))  # one char per id: ids 1..512, </s> 513


def reward(completions: list[str], **fields) -> list[float]:
    """The same reward for both trainers (llmkit: reward.fn=bench_rl:reward): varies within a group."""
    return [float(sum(map(ord, c)) % 3) for c in completions]


def write_model(name: str, directory: Path) -> tuple[Path, Path]:
    """A llmkit checkpoint and its Hugging Face export (for TRL), random weights."""
    from llmkit.hf import export_hf
    from llmkit.model import ModelConfig, Transformer
    from llmkit.text.tokenizer import CharTokenizer

    torch.manual_seed(0)
    cfg = ModelConfig(**MODELS[name])
    model = Transformer(cfg)
    tokenizer = CharTokenizer(CHARS, ["</s>"])
    assert tokenizer.vocab_size == cfg.vocab_size
    checkpoint = directory / "base.ckpt"
    torch.save({"model_config": cfg.to_dict(), "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "LMDataModule": {"tokenizer": tokenizer.to_state()}}, checkpoint)
    return checkpoint, export_hf(model, tokenizer, directory / "hf")


def hf_tokenizer():
    """A fast tokenizer with the same ids as llmkit's CharTokenizer over CHARS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}, "</s>": len(CHARS) + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="<unk>")


def prompt_texts(n: int, longest: int = 32) -> list[str]:
    """n random prompts of longest / 2 to longest tokens."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(longest // 2, longest + 1, (n,), generator=g).tolist()
    return ["".join(CHARS[i] for i in torch.randint(0, len(CHARS), (k,), generator=g).tolist()) for k in lengths]


def per_step(rollouts: list[float], steps: list[float]) -> dict[str, float]:
    """Mean seconds per step after the first (warm-up) step; a trainer that generates for several steps
    at once has fewer rollouts than steps, so both are totals over the same steps."""
    skip = 1 if len(steps) > 1 else 0
    n = len(steps) - skip
    rollout = sum(rollouts[skip:]) / n
    return {"rollout": rollout, "update": sum(steps[skip:]) / n - rollout, "step": sum(steps[skip:]) / n}


class LlmkitStepTimes(Callback):
    """Instantiated by the llmkit run (callbacks.bench_steps._target_=bench_rl.LlmkitStepTimes): times each step
    from its batch's start to its end, as StepTimes does TRL's; the rollout inside is timed by wrapping the
    objective. The times go to the class, which the benchmark reads after the run."""

    rollouts: list[float] = []
    steps: list[float] = []

    def on_train_batch_start(self, *a, **k):
        self.started = time.perf_counter()

    def on_train_batch_end(self, *a, **k):
        LlmkitStepTimes.steps.append(time.perf_counter() - self.started)


def run_llmkit(checkpoint: Path, prompts: list[str], args: argparse.Namespace, work: Path) -> dict[str, float]:
    from llmkit.cli import main as llmkit
    from llmkit.posttrain.rl import OnlineRL

    work.mkdir(parents=True, exist_ok=True)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    LlmkitStepTimes.rollouts, LlmkitStepTimes.steps = [], []
    rollout = OnlineRL.rollout

    def timed(*a, **k):
        started = time.perf_counter()
        out = rollout(*a, **k)
        LlmkitStepTimes.rollouts.append(time.perf_counter() - started)
        return out

    OnlineRL.rollout = timed
    try:
        llmkit(["train", f"hydra.run.dir={work / 'run'}", f"paths.data_dir={work / 'cache'}", "task=grpo",
                f"init_from={checkpoint}", "data=prompts", f"data.path={data}", "data.template=raw",
                f"data.batch_size={len(prompts)}", "reward=function", "reward.fn=bench_rl:reward",
                f"task.num_generations={args.generations}", f"task.max_completion_length={args.completion}",
                f"trainer.max_steps={args.steps}", f"trainer.log_every_n_steps={args.log_every}",
                "trainer.enable_progress_bar=false", "preflight=off", "sample.max_new_tokens=1", "optim.lr=1e-5",
                "scheduler=constant", "scheduler.warmup_steps=0", "trainer.gradient_clip_val=null",
                "callbacks.checkpoint.save_last=false", "+callbacks.bench_steps._target_=bench_rl.LlmkitStepTimes"])
    finally:
        OnlineRL.rollout = rollout
    return per_step(LlmkitStepTimes.rollouts, LlmkitStepTimes.steps)


def run_trl(hf_dir: Path, prompts: list[str], args: argparse.Namespace, work: Path) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, per_device_train_batch_size=len(prompts) * args.generations,
        num_generations=args.generations, max_completion_length=args.completion, max_steps=args.steps,
        learning_rate=1e-5, beta=0.0, loss_type="dapo", temperature=1.0, logging_steps=args.log_every,
        report_to="none",
        save_strategy="no", bf16=False, disable_tqdm=True, seed=0, max_grad_norm=0.0,
    )
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    dataset = Dataset.from_dict({"prompt": prompts * (args.steps + 2)})
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=hf_tokenizer())
    rollouts, steps = [], []
    generate = trainer._generate_and_score_completions

    def timed(*a, **k):
        started = time.perf_counter()
        out = generate(*a, **k)
        rollouts.append(time.perf_counter() - started)
        return out

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append(time.perf_counter() - self.started)

    trainer._generate_and_score_completions = timed
    trainer.add_callback(StepTimes())
    trainer.train()
    return per_step(rollouts, steps)


def decode_speed(checkpoint: Path, prompts: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Completion tokens/s: the rollout sampler vs the serving engine, on the same rows."""
    from llmkit.checkpoint import load_checkpoint
    from llmkit.generation.groups import sample_groups
    from llmkit.serve.engine import Engine, SamplingParams

    loaded = load_checkpoint(checkpoint)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    ids = [tokenizer.encode(p) for p in prompts]
    rows = len(ids) * args.generations
    best = {"rollout": 0.0, "serve": 0.0}
    for _ in range(3):
        started = time.perf_counter()
        completions, _ = sample_groups(model, ids, args.generations, args.completion, temperature=1.0,
                                       generator=torch.Generator().manual_seed(0))
        best["rollout"] = max(best["rollout"], sum(map(len, completions)) / (time.perf_counter() - started))
        engine = Engine(model, tokenizer, max_batch=rows, max_queue=rows)
        done: list[int] = []
        started = time.perf_counter()
        for row in [p for p in ids for _ in range(args.generations)]:
            engine.submit(row, SamplingParams(max_tokens=args.completion, seed=0),
                          lambda e, done=done: done.append(1) if e.finish_reason else None)
        while len(done) < rows:
            engine.step()
        best["serve"] = max(best["serve"], rows * args.completion / (time.perf_counter() - started))
    return best


def early_stops(checkpoint: Path, prompts: list[str], args: argparse.Namespace, chance: float = 0.05) -> dict[str, float]:
    """Seconds per rollout when rows stop early, the stopped rows leaving the decoding batch or decoding to the
    end. A random model rarely samples its stop token, so each row is made to stop with `chance` per token (when
    its uniform draw is below it): completion lengths geometric, the same rows stopping at the same step in both."""
    import llmkit.generation.groups as groups
    from llmkit.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    model, stop = loaded.model.eval(), loaded.tokenizer.vocab_size - 1  # </s>
    ids = [loaded.tokenizer.encode(p) for p in prompts]
    sample = groups.next_tokens

    def stopping(logits, temperature, top_k, top_p, draws):
        return sample(logits, temperature, top_k, top_p, draws=draws).masked_fill(draws.squeeze(1) < chance, stop)

    groups.next_tokens = stopping
    best = {"compact": float("inf"), "full": float("inf"), "tokens": 0}
    try:
        for _ in range(3):
            for mode in ("compact", "full"):
                started = time.perf_counter()
                completions, _ = groups.sample_groups(model, ids, args.generations, args.completion, stop_id=stop,
                                                      compact=mode == "compact", generator=torch.Generator().manual_seed(0))
                best[mode] = min(best[mode], time.perf_counter() - started)
                best["tokens"] = sum(map(len, completions))
    finally:
        groups.next_tokens = sample
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=32, help="prompts of half this to this many tokens")
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--log-every", type=int, default=5, help="both trainers log every N steps")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each trainer, alternated; the fastest is shown")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both trainers (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # reward.fn=bench_rl:reward
    sys.modules.setdefault("bench_rl", sys.modules[__name__])  # the timer the run instantiates records here
    prompts = prompt_texts(args.prompts, args.prompt_length)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint, hf_dir = write_model(args.model, work)
        print(f"model {args.model} {MODELS[args.model]}, {args.prompts} prompts of {args.prompt_length // 2}-"
              f"{args.prompt_length} tokens x {args.generations} generations, "
              f"{args.completion} completion tokens, {args.steps} steps, torch threads {torch.get_num_threads()}")
        speed = decode_speed(checkpoint, prompts, args)
        stops = early_stops(checkpoint, prompts, args)
        runs: dict[str, list[dict[str, float]]] = {"llmkit": [], "trl": []}
        for repeat in range(args.repeats):  # alternated, the fastest of each kept: the least disturbed by other load
            runs["llmkit"].append(run_llmkit(checkpoint, prompts, args, work / f"llmkit{repeat}"))
            runs["trl"].append(run_trl(hf_dir, prompts, args, work / f"trl{repeat}"))
        ours, theirs = (min(runs[name], key=lambda t: t["step"]) for name in ("llmkit", "trl"))
    print(f"\n{'seconds per GRPO step':<24}{'rollout':>10}{'update':>10}{'step':>10}")
    for name, t in (("llmkit", ours), ("TRL GRPOTrainer", theirs)):
        print(f"{name:<24}{t['rollout']:>10.3f}{t['update']:>10.3f}{t['step']:>10.3f}")
    print(f"{'TRL / llmkit':<24}{theirs['rollout'] / ours['rollout']:>9.2f}x{theirs['update'] / ours['update']:>9.2f}x"
          f"{theirs['step'] / ours['step']:>9.2f}x")
    print(f"\nrollout decode: {speed['rollout']:.0f} tokens/s; llmkit serve engine, same rows: {speed['serve']:.0f} "
          f"tokens/s; rollout / serve = {speed['rollout'] / speed['serve']:.2f}x")
    rows = args.prompts * args.generations
    print(f"rows stopping early (5% chance per token; {stops['tokens']} of {rows * args.completion} tokens sampled): "
          f"stopped rows leave the batch {stops['compact'] * 1e3:.0f} ms per rollout, every row decoded to the end "
          f"{stops['full'] * 1e3:.0f} ms: {stops['full'] / stops['compact']:.2f}x")


if __name__ == "__main__":
    main()

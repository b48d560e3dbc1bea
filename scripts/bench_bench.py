"""Benchmark of `llmkit bench`, each figure against its baseline in the same process, on the same model:

  1. llmkit bench vs lm-evaluation-harness (through llmkit's adapter) on the same MMLU questions:
     questions/s of each, end to end and scoring alone, and whether every question's acc is identical.
  2. Shared-context scoring (one prefill per question, KV cache fanned out to the choices) vs one forward
     per choice, on the same MMLU and HellaSwag requests: questions/s and the largest log-likelihood gap.
  3. In-training cost: a fast suite (arc_easy, hellaswag, piqa at --suite-limit questions each) at the
     default interval (every 200 of 600 steps) against the default run's training time (the tiny preset,
     seq 128, batch 16, AdamW; step time measured here, times 600).
  4. --full-mmlu: all 14,042 MMLU test questions on the model, wall time.

  python scripts/bench_bench.py [--questions 500] [--size 25m|tiny] [--threads 2] [--suite-limit 100] [--full-mmlu]

The model is randomly initialised (speed does not depend on the weights) with a 2,048-piece BPE trained
here on the benchmark texts; 25m: d_model 512, 8 layers, 8 heads (the bench model of bench_serve.py).
Needs the offline data (llmkit bench fetch=true) and lm-eval (pip install "llmkit[eval]").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from llmkit.bench.data import data_dir
from llmkit.bench.runner import load_tasks, run_task
from llmkit.bench.scoring import encode_question, loglikelihoods, per_choice_loglikelihoods
from llmkit.bench.tasks import Task
from llmkit.model import ModelConfig, Transformer
from llmkit.text.tokenizer import train_bpe

SIZES = {"tiny": {"d_model": 128, "n_layers": 4, "n_heads": 4}, "25m": {"d_model": 512, "n_layers": 8, "n_heads": 8}}


def model_for(size: str, vocab: int, max_seq_len: int = 2048) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, max_seq_len=max_seq_len, position={"name": "rope"}, **SIZES[size])).eval()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def vs_lm_eval(model: Transformer, tok, task: Task, batch_size: int) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llmkit.lm_eval_adapter import LLMKitLM

    mine, t_mine = timed(lambda: run_task(model, tok, task, batch_size=batch_size))
    with tempfile.TemporaryDirectory() as tmp:  # the same requests as an lm-eval task over local JSONL
        rows = Path(tmp, "q.jsonl")
        rows.write_text("".join(json.dumps({"context": d.context, "answer": d.gold}) + "\n" for d in task.docs))
        Path(tmp, "q.yaml").write_text(
            f"task: bench_mmlu\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {rows}\ntest_split: test\n"
            'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: ["A", "B", "C", "D"]\n'
            "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
        adapter = LLMKitLM(model=model, tokenizer=tok, batch_size=batch_size)
        manager = TaskManager(include_path=tmp, include_defaults=False)
        theirs, t_theirs = timed(lambda: lm_eval.simple_evaluate(model=adapter, tasks=["bench_mmlu"], task_manager=manager,
                                                                 log_samples=True))
    same = [float(s["acc"]) for s in sorted(theirs["samples"]["bench_mmlu"], key=lambda s: s["doc_id"])] == \
        [s["acc"] for s in mine["samples"]]
    pairs = [tuple(adapter._encode_pair(d.context, d.continuation(i))) for d in task.docs for i in range(4)]
    _, t_adapter = timed(lambda: adapter._score(pairs))
    t_shared = mine["seconds"]
    n = len(task.docs)
    print(f"1. MMLU, {n} questions, 0-shot: llmkit bench {n / t_mine:.1f} q/s ({t_mine:.1f} s), "
          f"lm-eval via adapter {n / t_theirs:.1f} q/s ({t_theirs:.1f} s): {t_theirs / t_mine:.2f}x; "
          f"scoring alone: llmkit {n / t_shared:.1f} q/s vs adapter {n / t_adapter:.1f} q/s ({t_adapter / t_shared:.2f}x); "
          f"acc {mine['metrics']['acc']['value']:.4f} vs {theirs['results']['bench_mmlu']['acc,none']:.4f}, "
          f"every question identical: {same}")


def shared_vs_per_choice(model: Transformer, tok, tasks: list[Task], batch_size: int) -> None:
    for task in tasks:
        requests = [encode_question(tok, d.context, [d.continuation(i) for i in range(len(d.choices))]) for d in task.docs]
        shared, t_shared = timed(lambda r=requests: loglikelihoods(model, r, batch_size))
        reference, t_ref = timed(lambda r=requests: per_choice_loglikelihoods(model, r, batch_size))
        gap = max(abs(a - b) for x, y in zip(shared, reference, strict=True) for a, b in zip(x, y, strict=True))
        n = len(requests)
        print(f"2. {task.name}, {n} questions x {len(task.docs[0].choices)} choices: shared context {n / t_shared:.1f} q/s, "
              f"per choice {n / t_ref:.1f} q/s: {t_ref / t_shared:.2f}x; largest log-likelihood gap {gap:.2e}")


def in_loop_cost(root: Path, limit: int, batch_size: int) -> None:
    suite = load_tasks(["arc_easy", "hellaswag", "piqa"], root, limit=limit, seed=1234)
    tok = train_bpe([d.context + " " + " ".join(d.choices) for t in suite for d in t.docs], 2048)
    model = model_for("tiny", tok.vocab_size, max_seq_len=128)  # the default run's model and context
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, tok.vocab_size, (16, 129))  # (batch 16, seq 128 + 1)
    model.train()
    for _ in range(3):  # warm-up
        model.loss(ids[:, :-1], ids[:, 1:]).loss.backward()
    _, t_steps = timed(lambda: [(model.loss(ids[:, :-1], ids[:, 1:]).loss.backward(), opt.step(), opt.zero_grad())
                                for _ in range(20)])
    step_s = t_steps / 20
    _, t_eval = timed(lambda: [run_task(model, tok, t, batch_size=batch_size) for t in suite])
    train_s, evals = 600 * step_s, 3  # default: 600 steps, every_n_steps = val_check_interval = 200
    print(f"3. in-loop: suite of {sum(len(t.docs) for t in suite)} questions ({', '.join(t.name for t in suite)}) "
          f"{t_eval:.1f} s per evaluation; default run {train_s:.0f} s ({step_s * 1000:.0f} ms/step x 600); "
          f"{evals} evaluations = {100 * evals * t_eval / train_s:.1f}% of training time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--size", choices=list(SIZES), default="25m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--suite-limit", type=int, default=100)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--full-mmlu", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], choices=["lm-eval", "shared", "in-loop"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = data_dir(args.data_dir)
    mmlu, hellaswag = load_tasks(["mmlu", "hellaswag"], root, limit=args.questions, seed=1234)
    tok = train_bpe([d.context + " " + " ".join(d.choices) for t in (mmlu, hellaswag) for d in t.docs], 2048)
    model = model_for(args.size, tok.vocab_size)
    print(f"model {args.size}: {model.num_params() / 1e6:.1f}M parameters, {args.threads} threads, batch {args.batch_size}")
    if "lm-eval" not in args.skip:
        vs_lm_eval(model, tok, mmlu, args.batch_size)
    if "shared" not in args.skip:
        shared_vs_per_choice(model, tok, [mmlu, hellaswag], args.batch_size)
    if "in-loop" not in args.skip:
        in_loop_cost(root, args.suite_limit, args.batch_size)
    if args.full_mmlu:
        full = load_tasks(["mmlu"], root)[0]
        result, seconds = timed(lambda: run_task(model, tok, full, batch_size=args.batch_size))
        print(f"4. full MMLU: {result['n']} questions in {seconds:.0f} s ({result['n'] / seconds:.1f} q/s), "
              f"acc {result['metrics']['acc']['value']:.4f}")


if __name__ == "__main__":
    main()

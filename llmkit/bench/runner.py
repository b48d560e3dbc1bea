"""One scorer per task kind (a registry entry), and `evaluate`: tasks -> the results data.

`llmkit bench` and the in-training callback (llmkit/lit/downstream.py) both call `run_task`, so they give
the same numbers on the same checkpoint and questions.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import torch

from llmkit.bench import execution
from llmkit.bench.metrics import METRICS, composite, pass_at_k, random_baseline, summarize
from llmkit.bench.scoring import empty_context, encode_question, loglikelihoods, mc_record
from llmkit.bench.tasks import Task
from llmkit.generation import generate
from llmkit.model import Transformer
from llmkit.registry import Registry
from llmkit.text.tokenizer import Tokenizer

Scorer = Callable[..., list[dict[str, Any]]]
SCORERS: Registry[list[dict[str, Any]]] = Registry("task kind")


@SCORERS.register("multiple_choice")
def score_multiple_choice(model: Transformer, tokenizer: Tokenizer, task: Task, batch_size: int = 16, **_: Any) -> list[dict]:
    conts = [[d.continuation(i) for i in range(len(d.choices))] for d in task.docs]
    requests = [encode_question(tokenizer, d.context, c) for d, c in zip(task.docs, conts, strict=True)]
    lls = loglikelihoods(model, requests, batch_size)
    return [
        {"doc_id": d.doc_id, "gold": d.gold, "loglikelihoods": ll,
         **mc_record(ll, [len(t) for t in req[1]], d.choices, c, d.gold)}
        for d, ll, req, c in zip(task.docs, lls, requests, conts, strict=True)
    ]


def _complete(model: Transformer, tokenizer: Tokenizer, prompts: list[str], stop: list[str], max_new_tokens: int,
              temperature: float = 0.0, generator: torch.Generator | None = None, batch_size: int = 16) -> list[str]:
    """Batched KV-cache decoding (llmkit.generation), each text cut at its first stop string."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else []
    texts = []
    for start in range(0, len(prompts), batch_size):
        ids = [tokenizer.encode(p) or empty_context(tokenizer) for p in prompts[start : start + batch_size]]
        new = generate(model, ids, max_new_tokens, temperature=temperature, stop_ids=eos, generator=generator)
        for row in new:
            text = tokenizer.decode(row)
            texts.append(text[: min((text.find(s) for s in stop if s and s in text), default=len(text))])
    return texts


def extract(text: str, regex: str | None) -> str:
    """The answer in a completion: the regex's first group (or whole match) when given, else the text."""
    if regex:
        match = re.search(regex, text)
        text = (match.group(1) if match.groups() else match.group(0)) if match else ""
    return text.strip()


@SCORERS.register("generation")
def score_generation(model: Transformer, tokenizer: Tokenizer, task: Task, batch_size: int = 16, **_: Any) -> list[dict]:
    opts = task.options
    stop = list(opts.get("stop", ["\n"]))
    texts = _complete(model, tokenizer, [d.context for d in task.docs], stop, int(opts.get("max_new_tokens", 32)),
                      batch_size=batch_size)
    records = []
    for d, text in zip(task.docs, texts, strict=True):
        answer = extract(text, opts.get("regex"))
        records.append({"doc_id": d.doc_id, "completion": text, "extracted": answer,
                        "exact_match": float(answer in [a.strip() for a in d.answers])})
    return records


@SCORERS.register("code")
def score_code(model: Transformer, tokenizer: Tokenizer, task: Task, batch_size: int = 16, allow_code_execution: bool = False,
               n_samples: int = 1, k: tuple[int, ...] = (1,), temperature: float = 0.8, seed: int = 1234,
               timeout: float = 3.0, **_: Any) -> list[dict]:
    if not allow_code_execution:  # refused before any generation: nothing is wasted
        raise execution.CodeExecutionRefused(f"task {task.name}: {execution.REFUSAL}")
    opts = task.options
    temp = 0.0 if n_samples == 1 else temperature  # one sample: greedy, as pass@1 is usually reported
    generator = torch.Generator(device=model.head.weight.device).manual_seed(seed)
    prompts = [d.prompt for d in task.docs for _ in range(n_samples)]
    completions = _complete(model, tokenizer, prompts, list(opts.get("stop", [])), int(opts.get("max_new_tokens", 256)),
                            temp, generator, batch_size)
    programs = [execution.humaneval_program(d.prompt, c, d.tests, d.entry_point)
                for d, c in zip((d for d in task.docs for _ in range(n_samples)), completions, strict=True)]
    outcomes = execution.check_all(programs, allow_code_execution, timeout)
    records = []
    for i, d in enumerate(task.docs):
        mine = outcomes[i * n_samples : (i + 1) * n_samples]
        correct = sum(o.passed for o in mine)
        record = {"doc_id": d.doc_id, "n": n_samples, "correct": correct,
                  "completions": completions[i * n_samples : (i + 1) * n_samples], "results": [o.result for o in mine]}
        record.update({f"pass@{kk}": pass_at_k(n_samples, correct, kk) for kk in k if kk <= n_samples})
        records.append(record)
    return records


def run_task(model: Transformer, tokenizer: Tokenizer, task: Task, **options: Any) -> dict[str, Any]:
    """One task's result: metrics with standard errors, n, random baseline, seconds, per-question records."""
    start = time.perf_counter()
    records = SCORERS.get(task.kind)(model, tokenizer, task, **options)
    keys = METRICS[task.kind] or tuple(key for key in records[0] if key.startswith("pass@"))
    return {
        "kind": task.kind, "n": len(records), "primary": task.primary, "metrics": summarize(records, keys),
        "random_baseline": random_baseline(task.kind, task.docs), "seconds": time.perf_counter() - start,
        "samples": records,
    }


def evaluate(model: Transformer, tokenizer: Tokenizer, tasks: list[Task], **options: Any) -> dict[str, Any]:
    results = {task.name: run_task(model, tokenizer, task, **options) for task in tasks}
    return {"tasks": results, "composite": composite(results)}


def load_tasks(names: list[str], data_dir: Any = None, tasks_dir: Any = None, num_fewshot: int = 0, seed: int = 1234,
               limit: int | float | None = None) -> list[Task]:
    """Tasks by name (built-in or from tasks_dir), each cut to its fixed seeded subset of `limit` questions."""
    from llmkit.bench.custom import load_tasks_dir
    from llmkit.bench.data import data_dir as cache_dir
    from llmkit.bench.tasks import get_task

    own = load_tasks_dir(tasks_dir) if tasks_dir else {}
    root = cache_dir(data_dir)
    return [get_task(name, root, num_fewshot, seed, own).subset(limit, seed) for name in names]

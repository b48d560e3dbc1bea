"""The downstream section of `llmkit report`: each point's eval/<task>/<metric> (mean +- std over seeds, from
summary.json) and, between every two points, a paired test on the same questions (the runs' downstream.json,
matched by seed; the questions of all matched seeds pooled)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from llmkit.bench.paired import compare_task


def downstream_lines(points: list[Any], alpha: float = 0.05) -> list[str]:
    """points: llmkit.report.Point (label, completed runs with path, overrides and summary)."""
    keys = sorted({k for p in points for r in p.completed for k in r.summary if k.startswith("eval/") and k != "eval/seconds"})
    if not keys:
        return []
    lines = ["## Downstream benchmarks (callbacks=downstream)", "", "| point | " + " | ".join(keys) + " |",
             "|---|" + "---|" * len(keys)]
    for p in points:
        lines.append(f"| {p.label} | " + " | ".join(_mean_std([r.summary.get(k) for r in p.completed]) for k in keys) + " |")
    pairs = [(a, b) for i, a in enumerate(points) for b in points[i + 1 :]]
    rows = [row for a, b in pairs for row in _paired_rows(a, b, alpha)]
    if rows:
        lines += ["", "Paired tests on the same questions (McNemar for 0/1 metrics, paired bootstrap otherwise; "
                  f"alpha={alpha}):", "", "| a | b | task | metric | a | b | diff | n | p | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|", *rows]
    return lines + [""]


def _mean_std(values: list[Any]) -> str:
    values = [float(v) for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.fmean(values):.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")


def _records(run: Any) -> dict[str, Any] | None:
    path = Path(run.path) / "downstream.json"
    return json.loads(path.read_text())["tasks"] if path.exists() else None


def _paired_rows(a: Any, b: Any, alpha: float) -> list[str]:
    by_seed = {r.overrides.get("seed"): r for r in b.completed}
    matched = [(ra, by_seed[ra.overrides.get("seed")]) for ra in a.completed if ra.overrides.get("seed") in by_seed]
    pooled: dict[str, tuple[dict, dict]] = {}
    for i, (ra, rb) in enumerate(matched):
        ta, tb = _records(ra), _records(rb)
        if ta is None or tb is None:
            continue
        for task in ta.keys() & tb.keys():
            pa, pb = pooled.setdefault(task, ({"samples": [], "metrics": {}}, {"samples": []}))
            pa["metrics"] = {ta[task]["primary"]: None}
            pa["samples"] += [{**s, "doc_id": (i, s["doc_id"])} for s in ta[task]["samples"]]
            pb["samples"] += [{**s, "doc_id": (i, s["doc_id"])} for s in tb[task]["samples"]]
    rows = []
    for task, (pa, pb) in sorted(pooled.items()):
        for metric, r in compare_task(pa, pb, alpha).items():
            rows.append(f"| {a.label} | {b.label} | {task} | {metric} | {r['a']:.4f} | {r['b']:.4f} | {r['diff']:+.4f} | "
                        f"{r['n']} | {r['p']:.3g} | {r['verdict']} |")
    return rows

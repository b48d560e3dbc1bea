"""The results file: every task's metrics, where they came from, and (log_samples) each question's record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmkit.provenance import git_commit


def with_metadata(results: dict[str, Any], **meta: Any) -> dict[str, Any]:
    """results plus model, checkpoint, git commit, seed, batch size ... (given by the caller)."""
    return {**meta, "git_commit": git_commit(), **results}


def without_samples(results: dict[str, Any]) -> dict[str, Any]:
    return {**results, "tasks": {name: {k: v for k, v in t.items() if k != "samples"} for name, t in results["tasks"].items()}}


def write(results: dict[str, Any], path: str | Path, log_samples: bool) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results if log_samples else without_samples(results), indent=2) + "\n")
    return path


def read(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def table(results: dict[str, Any]) -> list[str]:
    """A markdown table: task, metric, value +- stderr, n, random baseline; then the composite."""
    lines = ["| task | metric | value | stderr | n | random |", "|---|---|---|---|---|---|"]
    for name, task in results["tasks"].items():
        for metric, m in task["metrics"].items():
            stderr = "" if m["stderr"] is None else f"{m['stderr']:.4f}"
            lines.append(f"| {name} | {metric} | {m['value']:.4f} | {stderr} | {task['n']} | {task['random_baseline']:.4f} |")
    if results.get("composite") is not None:
        lines.append(f"\ncomposite (baseline subtracted, rescaled): {results['composite']:.4f}")
    return lines

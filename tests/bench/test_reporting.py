"""`llmkit report` shows each point's downstream numbers and paired tests between points."""

from __future__ import annotations

import json
from pathlib import Path

from llmkit.report import write_report


def fake_run(root: Path, name: str, arm: str, seed: int, correct: list[int]) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- model={arm}\n- seed={seed}\n")
    acc = sum(correct) / len(correct)
    (run / "summary.json").write_text(json.dumps({"status": "completed", "final_val_loss": 2.0 + seed / 10,
                                                  "eval/quiz/acc": acc, "eval/seconds": 1.0}))
    samples = [{"doc_id": i, "acc": float(c)} for i, c in enumerate(correct)]
    (run / "downstream.json").write_text(json.dumps({"step": 4, "tasks": {"quiz": {"primary": "acc", "samples": samples}}}))


def test_report_has_downstream_table_and_paired_verdicts(tmp_path: Path) -> None:
    n = 40
    for seed in (1, 2):
        fake_run(tmp_path, f"big{seed}", "big", seed, [1] * n)
        fake_run(tmp_path, f"small{seed}", "small", seed, [1, 0, 0, 0] * (n // 4))
        fake_run(tmp_path, f"same{seed}", "same", seed, [1, 0, 0, 0] * (n // 4))
    write_report(tmp_path, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Downstream benchmarks" in md and "| model=big | 1.0000 ± 0.0000 |" in md
    rows = {frozenset(c.strip() for c in line.split("|")[1:3]): line for line in md.splitlines() if "| quiz | acc |" in line}
    assert "differs beyond noise" in rows[frozenset({"model=big", "model=small"})]
    assert "| 80 |" in rows[frozenset({"model=big", "model=small"})]  # both seeds' questions, paired by seed
    assert "within noise" in rows[frozenset({"model=small", "model=same"})]

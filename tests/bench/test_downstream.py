"""callbacks=downstream: benchmarks during training give `llmkit bench`'s numbers on the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmkit.cli import main as llmkit
from llmkit.lit.downstream import dedup, shard
from tests.conftest import TINY_RUN


def test_shards_cover_every_question_once_after_dedup() -> None:
    docs = [{"doc_id": i} for i in range(7)]
    for world in (1, 2, 3, 8):
        shards = [shard(docs, rank, world) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1  # the same number of batches on every rank
        assert dedup([d for s in shards for d in s]) == docs


@pytest.mark.extended
def test_in_training_numbers_equal_llmkit_bench(bench_data: Path, tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "quiz.jsonl").write_text("".join(
        json.dumps({"query": f"def f{i}(", "choices": ["x):", "self):", "*args):"], "gold": i % 3}) + "\n" for i in range(9)))
    run = tmp_path / "run"
    llmkit(["train", f"hydra.run.dir={run}", f"data.cache_dir={tmp_path / 'cache'}", *TINY_RUN, "callbacks=downstream",
            "callbacks.downstream.tasks=[mmlu,quiz]", f"callbacks.downstream.data_dir={bench_data}",
            f"callbacks.downstream.tasks_dir={tmp_path / 'tasks'}", "callbacks.downstream.every_n_steps=2",
            "callbacks.downstream.limit=4", "callbacks.downstream.seed=7"])
    summary = json.loads((run / "summary.json").read_text())
    out = tmp_path / "bench.json"
    llmkit(["bench", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"data_dir={bench_data}", f"tasks_dir={tmp_path / 'tasks'}",
            "tasks=[mmlu,quiz]", "limit=4", "seed=7", f"out={out}", "log_samples=true"])
    bench = json.loads(out.read_text())
    for task in ("mmlu", "quiz"):
        for metric, m in bench["tasks"][task]["metrics"].items():
            # the same scorer on the same weights and questions in fp32: equal up to summation order
            assert summary[f"eval/{task}/{metric}"] == pytest.approx(m["value"], abs=1e-6), (task, metric)
    downstream = json.loads((run / "downstream.json").read_text())
    assert downstream["step"] == 4 and [s["doc_id"] for s in downstream["tasks"]["quiz"]["samples"]] == \
        [s["doc_id"] for s in bench["tasks"]["quiz"]["samples"]]
    metrics = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "eval/mmlu/acc" in metrics and "eval/seconds" in metrics


@pytest.mark.extended
def test_two_ddp_ranks_give_the_single_process_numbers(bench_data: Path, tmp_path: Path) -> None:
    """Each rank scores its shard (9 questions: one rank's shard is padded with a repeat), the records are
    gathered and de-duplicated: the metrics equal `llmkit bench` in one process on the same checkpoint."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "quiz.jsonl").write_text("".join(
        json.dumps({"query": f"def f{i}(", "choices": ["x):", "self):", "*args):"], "gold": i % 3}) + "\n" for i in range(9)))
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run}", f"data.cache_dir={tmp_path / 'cache'}", *TINY_RUN,
           "trainer=ddp_cpu", "callbacks=downstream", "callbacks.downstream.tasks=[quiz,mmlu]",
           f"callbacks.downstream.data_dir={bench_data}", f"callbacks.downstream.tasks_dir={tmp_path / 'tasks'}",
           "callbacks.downstream.every_n_steps=4", "callbacks.downstream.limit=null"]
    result = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    out = tmp_path / "bench.json"
    llmkit(["bench", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"data_dir={bench_data}", f"tasks_dir={tmp_path / 'tasks'}",
            "tasks=[quiz,mmlu]", f"out={out}"])
    bench = json.loads(out.read_text())
    for task in ("quiz", "mmlu"):
        assert bench["tasks"][task]["n"] == len(json.loads((run / "downstream.json").read_text())["tasks"][task]["samples"])
        for metric, m in bench["tasks"][task]["metrics"].items():
            assert summary[f"eval/{task}/{metric}"] == pytest.approx(m["value"], abs=1e-6), (task, metric)

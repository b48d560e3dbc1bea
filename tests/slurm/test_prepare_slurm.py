"""`llmkit prepare executor=slurm tasks=4` on a real SLURM cluster (CI: slurm/local-cluster.sh up): every stage a
job array of 4 tasks through submitit. The shards and manifest equal the single-process build byte for byte,
near duplicates planted in other files than their originals (so in other tasks' pieces) are found, and a task
SIGKILLed half-way through writing a shard is resubmitted without changing a byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.prep_corpus import EXACT, NEAR, dataset_digest, write_corpus

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same command in one process."""
    data_dir = tmp_path_factory.mktemp("single")
    return built(data_dir, llmkit_prepare(corpus, data_dir, "executor=none"))


def llmkit_prepare(
    corpus: Path, data_dir: Path, *overrides: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """The command line a user types; one piece per input file."""
    cmd = [
        str(Path(sys.executable).parent / "llmkit"), "prepare", "data=jsonl", f"data.path={corpus}/part*.jsonl*",
        "data.source_options.id_field=id", "data.vocab_size=400", "data.shard_tokens=3000", "data.progress=false",
        f"paths.data_dir={data_dir}", "hydra.run.dir=.", "piece_mb=0", *overrides,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def built(data_dir: Path, run: subprocess.CompletedProcess) -> Path:
    assert run.returncode == 0, run.stderr[-3000:]
    (out,) = data_dir.glob("jsonl-bpe-*")
    return out


def test_four_slurm_tasks_equal_one_process_and_find_copies_across_tasks(corpus: Path, reference: Path, tmp_path: Path) -> None:
    out = built(tmp_path, llmkit_prepare(corpus, tmp_path, "executor=slurm", "tasks=4"))
    assert out.name == reference.name and dataset_digest(out) == dataset_digest(reference)
    filters = json.loads((out / "jsonl" / "cleaning_report.json").read_text())["filters"]
    assert filters["exact_dedup"]["removed"] + filters["near_dedup"]["removed"] == NEAR + EXACT
    assert filters["near_dedup"]["removed"] >= NEAR - 1
    log = json.loads((out / "prepare_log.json").read_text())
    assert log["executor"] == "slurm" and log["tasks"] == 4


def test_a_slurm_task_killed_mid_write_is_resubmitted_and_changes_nothing(corpus: Path, reference: Path, tmp_path: Path) -> None:
    env = {**os.environ, "LLMKIT_PREPARE_KILL": "*/jsonl/train_00001.bin", "LLMKIT_PREPARE_KILL_ONCE": str(tmp_path / "killed")}
    run = llmkit_prepare(corpus, tmp_path, "executor=slurm", "tasks=4", env=env)
    out = built(tmp_path, run)
    assert (tmp_path / "killed").exists() and "was killed; resubmitting" in run.stderr
    assert dataset_digest(out) == dataset_digest(reference)

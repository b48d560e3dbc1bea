"""Preparation as tasks of submitit jobs on this machine (executor=local): 4 tasks give the single-process bytes, a
task killed mid-write (SIGKILL) is resubmitted and the shards do not change, a unit's error names its input.
Each build starts a few processes per stage, so these run with the extended tests; tests/slurm runs them on SLURM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llmkit.data.prep.executors import Submitit, UnitError, make_executor
from llmkit.data.prep.pipeline import prepare
from llmkit.data.shards import MANIFEST
from tests.data.prep_corpus import corpus_spec, dataset_digest, write_corpus

pytestmark = pytest.mark.extended


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare(corpus_spec(corpus), tmp_path_factory.mktemp("single"), "web", progress=False)


def test_four_local_tasks_equal_one_process(corpus: Path, reference: Path, tmp_path: Path) -> None:
    executor = make_executor("local", tasks=4, progress=False)
    out = prepare(corpus_spec(corpus), tmp_path, "web", executor=executor, piece_bytes=0)
    assert dataset_digest(out) == dataset_digest(reference)
    assert max(entry.units for entry in executor.log if entry.stage == "clean") == 6  # one piece per file
    log = json.loads((out / "prepare_log.json").read_text())
    assert log["executor"] == "local" and log["tasks"] == 4 and [s["stage"] for s in log["stages"]][:3] == [
        "clean", "minhash", "buckets"]


def test_a_task_killed_mid_write_is_rerun_and_the_shards_do_not_change(
    corpus: Path, reference: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("LLMKIT_PREPARE_KILL", "*/web/train_00002.bin")
    monkeypatch.setenv("LLMKIT_PREPARE_KILL_ONCE", str(tmp_path / "killed"))
    executor = Submitit("local", tasks=4, retries=1, progress=False)
    out = prepare(corpus_spec(corpus), tmp_path / "out", "web", executor=executor, piece_bytes=0)
    assert (tmp_path / "killed").exists()  # the task did die
    shards = [entry for entry in executor.log if entry.stage == "shards"]
    assert shards[0].ran == shards[0].units  # all of them, over two submissions
    assert dataset_digest(out) == dataset_digest(reference)


def test_a_corrupt_input_fails_naming_it_and_the_build_is_kept_for_a_rerun(corpus: Path, tmp_path: Path) -> None:
    broken = tmp_path / "in"
    broken.mkdir()
    for f in corpus.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "part2.jsonl").write_text('{"id": "x", "text": "ok"}\n{"id": "y", "text": \n')
    executor = make_executor("local", tasks=2, retries=0, progress=False)
    with pytest.raises(UnitError, match=r"clean web/00002: .*part2.jsonl, line 2: not valid JSON"):
        prepare(corpus_spec(broken), tmp_path / "out", "web", executor=executor, piece_bytes=0)
    (work,) = (tmp_path / "out").glob(".*.work")
    assert not (work / MANIFEST).exists() and not [p for p in (tmp_path / "out").iterdir() if p != work]
    done = sorted(p.stem for p in (work / ".prep" / "done" / "clean" / "web").glob("*.json"))
    assert "00002" not in done and os.path.exists(work / ".prep" / "errors" / "clean" / "web" / "00002.txt")

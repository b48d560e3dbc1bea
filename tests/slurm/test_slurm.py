"""Launches through a real SLURM cluster (CI: slurm/local-cluster.sh up): sbatch + srun with
FSDP on 2 CPU processes, and preemption -> checkpoint -> requeue -> exact continuation.

One job proves all of it, on two ranks: the signal reaching every rank, their agreement on the
step, the sharded checkpoint, the requeue and the exact continuation. A single-process run takes
the same path without the agreement (tests/lit/test_preemption.py), and resumes exactly as
tests/test_resume.py shows; a second SLURM job for it would double this file's minute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmkit.checkpoint import consolidate

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "data.max_bytes=20000", "data.split=tail", "data.tokenizer=char", "data.seq_len=64",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "sample.max_new_tokens=8",
]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def sbatch(tmp: Path, tasks: int, *overrides: str) -> str:
    env = {**os.environ, "LLMKIT_RUN_DIR": str(tmp / "run"), "LLMKIT_DATA_DIR": str(tmp / "cache"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the job's python is this one
    cmd = [
        "sbatch", "--parsable", "--gpus-per-node=0", f"--ntasks-per-node={tasks}", "--cpus-per-task=1",
        f"--output={tmp}/slurm-%j.out", "slurm/single_node.sbatch", *TINY, *overrides,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout.strip()


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), "UNKNOWN")


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


def wait_done(job: str, tmp: Path, timeout: float = 240) -> None:
    wait_until(lambda: job_state(job) in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout, f"job {job}")
    log = (tmp / f"slurm-{job}.out").read_text()
    assert job_state(job) == "COMPLETED", log[-3000:]


def preempt_and_requeue(job: str, tmp: Path, after_lines: int) -> Path:
    """Send the signal SLURM sends before a time limit to every task once `after_lines` steps are
    logged, check the job checkpoints and goes back to the queue, then let it start again."""
    metrics = tmp / "run" / "csv" / "metrics.csv"
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) > after_lines, 180, "logged steps")
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # to the job step's tasks: every rank
    preempted = tmp / "run" / "checkpoints" / "preempted.ckpt"
    wait_until(preempted.exists, 60, "the preemption checkpoint")
    wait_until(lambda: job_state(job) == "PENDING", 60, "the requeue")
    # SLURM holds a requeued job for 2 minutes (its BeginTime); let it start now
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    wait_done(job, tmp)
    assert "Restored all states from the checkpoint" in (tmp / f"slurm-{job}.out").read_text()
    return preempted


def reference_run(tmp: Path, *overrides: str) -> Path:
    """The same run, uninterrupted and outside SLURM."""
    reference = tmp / "reference"
    env = {**os.environ, "LLMKIT_DATA_DIR": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}  # as in the job
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID"):  # in case pytest itself runs inside a job
        env.pop(name, None)
    cmd = [sys.executable, "train.py", f"hydra.run.dir={reference}", *TINY, *overrides]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=400)
    return reference / "checkpoints" / "last.ckpt"


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name


def test_preempted_two_rank_fsdp_job_resumes_its_sharded_checkpoint_exactly(tmp_path: Path) -> None:
    """sbatch + srun start FSDP on 2 CPU processes. Both ranks get the signal, agree on the step, write
    one sharded checkpoint; the requeued job's two ranks load it and end with an uninterrupted run's weights."""
    steps = ["trainer=fsdp_cpu", "trainer.max_steps=60", "trainer.val_check_interval=30",
             "+logger.csv.flush_logs_every_n_steps=5"]
    job = sbatch(tmp_path, 2, *steps)
    preempted = preempt_and_requeue(job, tmp_path, after_lines=15)
    assert preempted.is_dir() and len(list(preempted.glob("*.distcp"))) == 2, "one shard per rank"
    step_at_signal = torch.load(preempted / "meta.pt", weights_only=True)["global_step"]
    assert 0 < step_at_signal < 60
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert log.count("[llmkit] job") == 2, "the batch script ran twice: before and after the requeue"

    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["config"]["trainer"]["devices"] == 2
    last = run / "checkpoints" / "last.ckpt"
    assert (last / ".metadata").exists() and len(list(last.glob("*.distcp"))) == 2

    reference = reference_run(tmp_path, *steps)
    a = torch.load(consolidate(reference, tmp_path / "reference.ckpt"), weights_only=True)
    b = torch.load(consolidate(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "run.ckpt"), weights_only=True)
    assert a["global_step"] == 60
    assert_same_weights(a, b)
    # the resumed ranks read the data where the preempted ones stopped
    assert a["LMDataModule"]["samples_consumed"] == b["LMDataModule"]["samples_consumed"]

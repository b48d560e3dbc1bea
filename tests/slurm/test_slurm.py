"""Launches through a real SLURM cluster (CI: slurm/local-cluster.sh up): sbatch + srun with
FSDP on 2 CPU processes, and preemption -> checkpoint -> requeue -> exact continuation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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


def test_sbatch_srun_fsdp_on_two_cpu_processes_trains_and_writes_a_sharded_checkpoint(tmp_path: Path) -> None:
    job = sbatch(tmp_path, 2, "trainer=fsdp_cpu", "trainer.max_steps=20", "trainer.val_check_interval=10")
    wait_done(job, tmp_path)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["config"]["trainer"]["devices"] == 2
    last = run / "checkpoints" / "last.ckpt"
    assert (last / ".metadata").exists() and len(list(last.glob("*.distcp"))) == 2


def test_preemption_signal_checkpoints_requeues_and_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    steps = ["trainer=cpu", "trainer.max_steps=200", "trainer.val_check_interval=100", "+logger.csv.flush_logs_every_n_steps=5"]
    job = sbatch(tmp_path, 1, *steps)
    metrics = tmp_path / "run" / "csv" / "metrics.csv"
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 40, 120, "40 logged steps")
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # what SLURM sends before a time limit
    preempted = tmp_path / "run" / "checkpoints" / "preempted.ckpt"
    wait_until(preempted.exists, 60, "the preemption checkpoint")
    wait_until(lambda: job_state(job) == "PENDING", 60, "the requeue")
    # SLURM holds a requeued job for 2 minutes (its BeginTime); let it start now
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    wait_done(job, tmp_path)
    assert "Restored all states from the checkpoint" in (tmp_path / f"slurm-{job}.out").read_text()
    step_at_signal = torch.load(preempted, weights_only=True)["global_step"]
    assert 0 < step_at_signal < 200

    reference = tmp_path / "reference"
    env = {**os.environ, "LLMKIT_DATA_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}  # as in the job
    cmd = [sys.executable, "train.py", f"hydra.run.dir={reference}", *TINY, *steps]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 200
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name

"""`python train.py -m launcher=slurm ...` sends one SLURM job per sweep point (hydra-submitit-launcher)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_submitit_multirun_runs_each_point_as_a_slurm_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    env = {**os.environ, "LLMKIT_DATA_DIR": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [
        sys.executable, "train.py", "-m", "launcher=slurm", f"hydra.sweep.dir={sweep}", "hydra.launcher.cpus_per_task=1",
        "data.max_bytes=20000", "data.split=tail", "data.tokenizer=char", "data.seq_len=64", "trainer.max_steps=10",
        "trainer.val_check_interval=10", "trainer.enable_progress_bar=false", "sample.max_new_tokens=8", "seed=1,2",
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(2)]
    assert [s["config"]["seed"] for s in summaries] == [1, 2]
    assert all(s["steps"] == 10 for s in summaries)
    # submitit submits the sweep as one job array: one array task (a SLURM job) per point
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 2, f"expected one SLURM job per point, got {tasks}"
    assert all((sweep / ".submitit" / t / f"{t}_0_result.pkl").exists() for t in tasks)

"""SIGKILL in the middle of post-training, then resume=auto: the weights of an uninterrupted run (extended)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.posttrain.helpers import longer_context, parity_records, preference_records, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
PERIODIC = [
    "+callbacks.periodic._target_=lightning.pytorch.callbacks.ModelCheckpoint",
    "+callbacks.periodic.every_n_train_steps=10", "+callbacks.periodic.dirpath=${paths.output_dir}/checkpoints",
    "+callbacks.periodic.filename='step-{step}'", "+callbacks.periodic.auto_insert_metric_name=false",
    "+callbacks.periodic.save_top_k=-1",
]
COMMON = ["trainer.max_steps=40", "trainer.val_check_interval=20", "trainer.enable_progress_bar=false", "preflight=off",
          "sample.max_new_tokens=4", "scheduler.warmup_steps=0", "resume=auto", "data.template=raw", *PERIODIC]


def run_command(run: Path, base: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "llmkit", "train", f"hydra.run.dir={run}", f"init_from={base}", *COMMON, *overrides]


def kill_when_written(proc: subprocess.Popen, checkpoint: Path, run: Path) -> None:
    """SIGKILL the run as soon as `checkpoint` exists; it must still have been mid-run."""
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (run / "summary.json").exists(), "the kill must land mid-run"


def killed_then_resumed(tmp_path: Path, base: Path, *overrides: str) -> None:
    env = {**os.environ, "LLMKIT_DATA_DIR": str(tmp_path / "cache")}
    subprocess.run(run_command(tmp_path / "reference", base, *overrides), cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    run = tmp_path / "run"
    proc = subprocess.Popen(run_command(run, base, *overrides), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoint = run / "checkpoints" / "step-20.ckpt"
    kill_when_written(proc, checkpoint, run)
    result = subprocess.run(run_command(run, base, *overrides), cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume=auto: resuming from" in result.stderr + result.stdout
    a = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 40
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name


@pytest.fixture
def base(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    return longer_context(tiny_checkpoint, tmp_path / "base.ckpt", 64)


@pytest.mark.extended
def test_sigkill_mid_lora_sft_then_resume_auto_gives_the_uninterrupted_adapters(base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "parity.jsonl", parity_records(100, seed=0))
    killed_then_resumed(tmp_path, base, "task=sft", "data=sft", f"data.path={data}", "data.batch_size=4",
                        "finetune=lora")


@pytest.mark.extended
def test_sigkill_mid_dpo_then_resume_auto_gives_the_uninterrupted_weights(base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records(60, seed=0))
    killed_then_resumed(tmp_path, base, "task=dpo", "data=preference", f"data.path={data}", "data.batch_size=4")


@pytest.mark.extended
def test_lora_sft_under_fsdp_on_two_cpu_processes(base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "parity.jsonl", parity_records(100, seed=0))
    env = {**os.environ, "LLMKIT_DATA_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "llmkit", "train", f"hydra.run.dir={tmp_path / 'run'}", f"init_from={base}",
           "task=sft", "data=sft", f"data.path={data}", "data.template=raw", "data.batch_size=4", "finetune=lora",
           "trainer=fsdp_cpu", "trainer.max_steps=6", "trainer.val_check_interval=6", "trainer.enable_progress_bar=false",
           "preflight=off", "sample.max_new_tokens=4"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").exists()

"""A run killed with SIGKILL and restarted with resume=auto ends exactly like an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmkit.checkpoint_files import find_resume_checkpoint, replace_directory
from llmkit.lit.checkpointing import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.max_bytes=20000", "data.split=tail", "data.tokenizer=char", "data.seq_len=64", "trainer.max_steps=60",
    "trainer.val_check_interval=30", "trainer.enable_progress_bar=false", "sample.max_new_tokens=8",
    "+callbacks.periodic._target_=lightning.pytorch.callbacks.ModelCheckpoint",
    "+callbacks.periodic.every_n_train_steps=10", "+callbacks.periodic.dirpath=${paths.output_dir}/checkpoints",
    "+callbacks.periodic.filename='step-{step}'", "+callbacks.periodic.auto_insert_metric_name=false",
    "+callbacks.periodic.save_top_k=-1",
]


def command(run_dir: Path) -> list[str]:
    return [sys.executable, "train.py", f"hydra.run.dir={run_dir}", "resume=auto", *TINY]


@pytest.mark.slow
@pytest.mark.extended  # 40 s of subprocess runs; in-process exact resume stays in the default run (test_training.py)
def test_sigkill_then_resume_auto_gives_identical_weights(tmp_path: Path) -> None:
    env = {**os.environ, "LLMKIT_DATA_DIR": str(tmp_path / "cache")}
    reference = tmp_path / "reference"
    subprocess.run(command(reference), cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)

    run = tmp_path / "run"
    proc = subprocess.Popen(command(run), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run / "checkpoints" / "step-20.ckpt"
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "the run should have reached step 20 before being killed"
    assert not (run / "summary.json").exists(), "the kill must land before the run finished"

    result = subprocess.run(command(run), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resume=auto: resuming from" in result.stderr + result.stdout
    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 60
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name


def test_resume_auto_picks_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    assert find_resume_checkpoint(tmp_path) is None
    for i, name in enumerate(["step-10.ckpt", "step-20.ckpt"]):
        (ckpts / name).write_bytes(b"x")
        os.utime(ckpts / name, ns=(i * 10**9, i * 10**9))
    (ckpts / "step-30.ckpt.tmp").write_bytes(b"half-written")  # a crash mid-save
    (ckpts / "sharded.ckpt").mkdir()  # a sharded directory without its metadata is incomplete
    assert find_resume_checkpoint(tmp_path) == ckpts / "step-20.ckpt"


def test_atomic_save_never_leaves_a_partial_file_under_the_real_name(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}, "the previous checkpoint survives a failed save"


def test_replacing_a_sharded_checkpoint_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path: Path) -> None:
    path, new = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    for d, tag in ((path, b"old"), (new, b"new")):
        d.mkdir()
        (d / ".metadata").write_bytes(tag)
        (d / "meta.pt").write_bytes(tag)
    original_rename = Path.rename

    def crash_after_first_rename(self: Path, target: Path) -> Path:
        if self == new:
            raise OSError("killed between the renames")
        return original_rename(self, target)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "rename", crash_after_first_rename)
        with pytest.raises(OSError):
            replace_directory(new, path)
    survivor = find_resume_checkpoint(tmp_path)
    assert survivor == tmp_path / "last.ckpt.old" and (survivor / ".metadata").read_bytes() == b"old"

    replace_directory(new, path)  # the next save completes the swap
    assert (path / ".metadata").read_bytes() == b"new" and not new.exists()
    assert not (tmp_path / "last.ckpt.old").exists()

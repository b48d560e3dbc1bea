"""Online RL on two CPU processes (gloo): GRPO and PPO under FSDP2 (every rank samples its own prompts with the
sharded model, the ranks decoding in lockstep; PPO's value head reads the hidden states through a hooked
method and is sharded too, so its gradient is reduced across ranks) take the steps DDP takes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.posttrain.test_rl import ANSWERS, RUN, char_base, prompts_file

ROOT = Path(__file__).resolve().parents[2]


def online_rl(run: Path, base: Path, data: Path, task: str, trainer: str) -> dict[str, list[float]]:
    env = {**os.environ, "LLMKIT_DATA_DIR": str(run.parent / "cache")}
    cmd = [sys.executable, "-m", "llmkit", "train", f"hydra.run.dir={run}", f"init_from={base}", "data=prompts",
           f"data.path={data}", *RUN, f"task={task}", "task.num_generations=4", "task.max_completion_length=3",
           "task.beta=0.04", "data.batch_size=3", "optim.lr=1e-2", "scheduler=constant", f"trainer={trainer}",
           *(["task.shared_prompts=false"] if task != "ppo" else []),  # FSDP runs every row whole: so does DDP here
           "trainer.max_steps=4", "trainer.val_check_interval=4"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    return {key: [float(r[key]) for r in rows if r.get(key)] for key in rows[0]}


@pytest.mark.extended
@pytest.mark.parametrize("task", ["grpo", "ppo"])
def test_online_rl_under_fsdp_on_two_processes_takes_the_steps_ddp_takes(tmp_path: Path, task: str) -> None:
    base = char_base(tmp_path / "base.ckpt")
    data = prompts_file(tmp_path / "p.jsonl")  # 12 prompts: 3 per rank and step
    ddp = online_rl(tmp_path / "ddp", base, data, task, "ddp_cpu")
    fsdp = online_rl(tmp_path / "fsdp", base, data, task, "fsdp_cpu")
    assert len(ddp["train/reward"]) == len(fsdp["train/reward"]) == 4
    # the same weights sample the same completions (the sampler's seed is (data seed, step, slot, rank)), so the
    # rewards are equal; the losses and KL differ only by the order of FSDP's sharded sums (fp32: ~1e-7 relative,
    # compounded over 4 steps at lr 1e-2: 1e-4 still fails a wrong normaliser or a rank that sampled other prompts)
    assert fsdp["train/reward"] == ddp["train/reward"]
    for key in ("train/loss", "train/kl", "train/completions/mean_length", *(("train/value_loss",) if task == "ppo" else ())):
        assert fsdp[key] == pytest.approx(ddp[key], rel=1e-4, abs=1e-6), key


@pytest.mark.extended
def test_a_reward_model_trains_under_fsdp_as_under_ddp(tmp_path: Path) -> None:
    """task=reward reads the hidden states through `features` (hooked under FSDP as forward is) into a score
    head sharded with the model, so its gradient is reduced across ranks as DDP reduces it."""
    base = char_base(tmp_path / "base.ckpt")
    pairs = [{"prompt": f"{d}=", "chosen": a, "rejected": r} for d, a in ANSWERS.items() for r in "xyz"] * 4
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    logged = {}
    for trainer in ("ddp_cpu", "fsdp_cpu"):
        run = tmp_path / trainer
        env = {**os.environ, "LLMKIT_DATA_DIR": str(tmp_path / "cache")}
        cmd = [sys.executable, "-m", "llmkit", "train", f"hydra.run.dir={run}", f"init_from={base}", "task=reward",
               "data=preference", f"data.path={data}", "data.template=raw", "data.val_fraction=0", "data.batch_size=3",
               "optim.lr=1e-2", *RUN[:5], f"trainer={trainer}", "trainer.max_steps=4"]
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
        logged[trainer] = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(logged["ddp_cpu"]) == 4 and logged["ddp_cpu"][-1] != logged["ddp_cpu"][0]  # the head learns
    assert logged["fsdp_cpu"] == pytest.approx(logged["ddp_cpu"], rel=1e-4)  # fp32, sharded sums in another order

"""End to end: ablation multiruns on the CPU, wandb offline, the report, and a failing sweep point."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from llmkit.cli import main as llmkit

ROOT = Path(__file__).resolve().parents[2]
FAST = [
    "data.max_bytes=20000", "data.split=tail", "data.tokenizer=char", "data.seq_len=32", "data.batch_size=8",
    "data.val_windows=16", "model.d_model=32", "model.n_layers=1",
    "scheduler.warmup_steps=2", "trainer.max_steps=6", "trainer.log_every_n_steps=1", "trainer.val_check_interval=3",
    "trainer.enable_progress_bar=false", "sample.max_new_tokens=4",
]


def multirun_here(tmp_path: Path, *overrides: str) -> Path:
    """A sweep through the Hydra app in this process, as `llmkit train -m` runs it (jobs one after another)."""
    sweep = tmp_path / "sweep"
    llmkit(["train", "-m", f"hydra.sweep.dir={sweep}", f"paths.data_dir={tmp_path / 'cache'}", *FAST, *overrides])
    return sweep


def make_report(sweep: Path) -> Path:
    llmkit(["report", f"dir={sweep}"])
    return sweep / "report"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_2x2_ablation_multirun_report_matches_runs_and_wandb_is_offline(tmp_path: Path, monkeypatch) -> None:
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key: wandb must go offline by itself
    sweep = multirun_here(tmp_path, "ablation=attention", "model/attention=mha,gqa", "seed=1,2",
                          "logger=[csv,tensorboard,wandb]")
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert names == ["0_attention=mha_seed=1", "1_attention=mha_seed=2", "2_attention=gqa_seed=1", "3_attention=gqa_seed=2"]
    summaries = {n: json.loads((sweep / n / "summary.json").read_text()) for n in names}
    assert all(s["status"] == "completed" for s in summaries.values())

    out = make_report(sweep)
    runs = {r["run"]: r for r in read_csv(out / "runs.csv")}
    assert sorted(runs) == names
    for name, summary in summaries.items():
        row = runs[name]
        val = [float(r["val/loss"]) for r in read_csv(sweep / name / "csv" / "metrics.csv") if r["val/loss"]]
        assert float(row["final_val_loss"]) == pytest.approx(summary["final_val_loss"], rel=1e-9)
        assert float(row["final_val_loss"]) == pytest.approx(val[-1], rel=1e-6)
        assert float(row["best_val_loss"]) == pytest.approx(min(val), rel=1e-6)
        for key in ("params", "tokens_per_s", "mfu", "wall_time_s", "peak_memory_bytes", "final_val_ppl"):
            assert float(row[key]) == pytest.approx(summary[key], rel=1e-9), key
        assert row["model/attention"] == summary["choices"]["model/attention"]

    points = read_csv(out / "report.csv")
    assert [p["model/attention"] for p in points] == ["mha", "gqa"]
    for point in points:
        losses = [s["final_val_loss"] for s in summaries.values() if s["choices"]["model/attention"] == point["model/attention"]]
        assert point["seeds_completed"] == "2" and float(point["final_val_loss_mean"]) == pytest.approx(sum(losses) / 2)
    md = (out / "report.md").read_text()
    assert "| mha | 2/2 |" in md and "| gqa | 2/2 |" in md and "seed-to-seed spread" in md
    assert (out / "val_loss.png").stat().st_size > 1000 and "base64" in (out / "report.html").read_text()

    for name, summary in summaries.items():  # wandb: offline (no API key), named after the sweep, resolved config logged
        (run_dir,) = (sweep / name / "wandb").glob("offline-run-*")
        logged = yaml.safe_load((run_dir / "files" / "llmkit_config.yaml").read_text())
        assert logged["params"] == summary["params"] and logged["git_commit"] == summary["git_commit"]
        assert logged["model"] == summary["config"]["model"] and logged["seed"] == summary["config"]["seed"]
        assert summary["config"]["logger"]["wandb"]["name"] == name
        assert summary["config"]["logger"]["wandb"]["group"].endswith("sweep")
        record = next(run_dir.glob("run-*.wandb")).read_bytes()
        assert name.encode() in record and b"git_commit" in record and b"n_kv_heads" in record
        assert list((sweep / name / "tensorboard").glob("events.out.tfevents.*")), "tensorboard logged alongside"


@pytest.mark.slow
def test_a_failing_point_is_reported_and_the_sweep_goes_on(tmp_path: Path, capsys) -> None:
    # n_heads=4 is not a multiple of n_kv_heads=3: the first point fails while the model is built
    sweep = multirun_here(tmp_path, "model.attention.n_kv_heads=3,null,2")
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(3)]
    assert [s["status"] for s in summaries] == ["failed", "completed", "completed"]
    assert "n_kv_heads=3" in summaries[0]["error"] and summaries[0]["config"]["model"]["attention"]["n_kv_heads"] == 3
    assert "sweep point failed" in "".join(capsys.readouterr())

    out = make_report(sweep)
    points = {p["model.attention.n_kv_heads"]: p for p in read_csv(out / "report.csv")}
    assert points["3"]["status"] == "failed" and points["3"]["final_val_loss_mean"] == ""
    for key, i in (("null", 1), ("2", 2)):
        assert points[key]["status"] == "ok"
        assert float(points[key]["final_val_loss_mean"]) == pytest.approx(summaries[i]["final_val_loss"], rel=1e-9)
    md = (out / "report.md").read_text()
    assert "| 3 | 0/1 |" in md and "FAILED" in md and "## Failed runs" in md and "n_kv_heads=3" in md


def test_a_single_run_that_fails_still_exits_non_zero(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        llmkit(["train", f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'cache'}", *FAST,
                "model.attention.n_kv_heads=3"])
    assert stop.value.code != 0 and "n_kv_heads=3" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"

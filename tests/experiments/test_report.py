"""llmkit.report on synthetic run directories: grouping, mean +- std, the seed-spread verdict, failures, outputs."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from llmkit import report


def fake_run(root: Path, num: int, overrides: dict[str, object], loss: float | None, steps: int = 30) -> Path:
    """A run directory as train.py leaves it: .hydra/overrides.yaml, summary.json, csv/metrics.csv."""
    run = root / f"{num}_run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {k}={v}\n" for k, v in overrides.items()) + "- data.x=1\n")
    (run / ".hydra" / "config.yaml").write_text("{}\n")
    if loss is None:
        summary = {"status": "failed", "error": "ValueError: n_heads=4 is not a multiple of n_kv_heads=3"}
    else:
        summary = {
            "status": "completed", "final_val_loss": loss, "best_val_loss": loss - 0.01, "final_val_ppl": math.exp(loss),
            "params": 1000 + num, "tokens_per_s": 100.0 * (num + 1), "mfu": 0.01, "wall_time_s": 5.0,
            "peak_memory_bytes": 2**20, "steps": steps, "tokens_seen": steps * 64, "git_commit": "abc",
        }
        (run / "csv").mkdir()
        with open(run / "csv" / "metrics.csv", "w") as f:
            f.write("epoch,step,train/loss,val/loss\n")
            for step in range(steps):
                val = loss + 1.0 / (step + 1) if (step + 1) % 10 == 0 else ""
                f.write(f"0,{step},3.0,{val}\n")
    (run / "summary.json").write_text(json.dumps(summary))
    return run


LOSSES = {("mha", 1): 2.00, ("mha", 2): 2.02, ("gqa", 1): 2.01, ("gqa", 2): 2.03, ("mqa", 1): 2.50, ("mqa", 2): 2.52}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for num, ((attn, seed), loss) in enumerate(LOSSES.items()):
        fake_run(root, num, {"model/attention": attn, "seed": seed}, loss)
    return root


def test_points_group_seeds_and_aggregate_mean_and_std(sweep: Path) -> None:
    runs = report.find_runs(sweep)
    assert report.swept_keys(runs) == ["model/attention", "seed"]  # data.x=1 is the same everywhere
    points = report.group_points(runs, report.swept_keys(runs))
    assert [p.choices for p in points] == [{"model/attention": a} for a in ("mha", "gqa", "mqa")]
    mean, std, n = points[0].stat("final_val_loss")
    assert n == 2 and mean == pytest.approx(2.01) and std == pytest.approx(statistics.stdev([2.00, 2.02]))


def test_differences_are_judged_against_the_pooled_seed_spread(sweep: Path) -> None:
    points = report.group_points(report.find_runs(sweep), ["model/attention", "seed"])
    s, dof = report.pooled_std(points)
    assert dof == 3 and s == pytest.approx(statistics.stdev([2.00, 2.02]))  # every point has the same spread
    verdicts = {(d["a"], d["b"]): d["larger"] for d in report.differences(points)}
    assert verdicts == {("attention=mha", "attention=gqa"): False, ("attention=mha", "attention=mqa"): True,
                        ("attention=gqa", "attention=mqa"): True}
    (d,) = [d for d in report.differences(points) if d["b"] == "attention=mqa" and d["a"] == "attention=mha"]
    assert d["diff"] == pytest.approx(-0.5) and d["threshold"] == pytest.approx(2 * s * math.sqrt(1 / 2 + 1 / 2))


def test_one_seed_per_point_says_there_is_no_spread(tmp_path: Path) -> None:
    for num, attn in enumerate(("mha", "gqa")):
        fake_run(tmp_path / "s", num, {"model/attention": attn, "seed": 1}, 2.0 + num)
    points = report.group_points(report.find_runs(tmp_path / "s"), ["model/attention"])
    assert report.pooled_std(points) == (None, 0)
    assert all(d["larger"] is None for d in report.differences(points))
    assert "no seed-to-seed spread" in report.significance_text(points)[0]


def test_report_files_rows_and_failures(sweep: Path, tmp_path: Path) -> None:
    fake_run(sweep, 6, {"model/attention": "bad", "seed": 1}, None)
    fake_run(sweep, 7, {"model/attention": "bad", "seed": 2}, None)
    out = tmp_path / "out"
    report.write_report(sweep, out)
    for name in ("report.md", "report.html", "report.csv", "runs.csv", "val_loss.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model/attention"] for r in rows] == ["mha", "gqa", "mqa", "bad"]
    assert float(rows[2]["final_val_loss_mean"]) == pytest.approx(2.51) and rows[2]["status"] == "ok"
    assert rows[3]["status"] == "failed" and rows[3]["final_val_loss_mean"] == ""
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 8 and sum(r["status"] == "failed" for r in runs) == 2
    md = (out / "report.md").read_text()
    assert "| bad | 0/2 |" in md and "FAILED" in md and "not a multiple of n_kv_heads=3" in md
    assert "2 of 3 pairwise differences are larger than the seed spread" in md
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_val_curve_is_val_loss_against_tokens_seen(sweep: Path) -> None:
    run = report.load_run(sweep / "0_run")
    assert run.curve == [(10 * 64, pytest.approx(2.1)), (20 * 64, pytest.approx(2.05)), (30 * 64, pytest.approx(2.0 + 1 / 30))]


def test_wandb_report_groups_the_sweep_by_its_swept_keys_without_publishing() -> None:
    """Only the construction: publishing needs network and an API key (not available in CI)."""
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    rep = report.publish_wandb_report("proj", "multirun/ablation-attention/t", ["model/attention", "seed", "optim.lr"], "T",
                                      "# table", entity="me", save=False)
    assert isinstance(rep, wr.Report)
    (runset,) = rep.blocks[1].runsets
    assert runset.groupby == ["config.choices.model/attention", "config.optim.lr"]
    assert runset.filters == "Metric('Group') == 'multirun/ablation-attention/t'"


def _set_data(run: Path, fingerprint: str) -> None:
    summary = json.loads((run / "summary.json").read_text())
    summary["data"] = {"dataset": f"/cache/text-bpe-{fingerprint}", "fingerprint": fingerprint}
    (run / "summary.json").write_text(json.dumps(summary))


def test_report_names_the_data_and_warns_when_runs_read_different_data(sweep: Path, tmp_path: Path) -> None:
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    for run in runs:
        _set_data(run, "aaaa")
    report.write_report(sweep, tmp_path / "same")
    md = (tmp_path / "same" / "report.md").read_text()
    assert "All runs read the same data: `text-bpe-aaaa` (fingerprint `aaaa`)." in md and "different datasets" not in md
    _set_data(runs[-1], "bbbb")
    report.write_report(sweep, tmp_path / "mixed")
    md = (tmp_path / "mixed" / "report.md").read_text()
    assert "**The runs read 2 different datasets**" in md and f"(fingerprint `bbbb`): {runs[-1].name}" in md

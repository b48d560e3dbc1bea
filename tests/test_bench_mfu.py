"""scripts/bench_mfu.py: the variant sweep runs train.py per variant and tabulates summary.json (CPU smoke)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_mfu", ROOT / "scripts" / "bench_mfu.py")
bench_mfu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_mfu)


@pytest.mark.slow
@pytest.mark.extended
def test_smoke_sweep_reports_mfu_per_variant(capsys, tmp_path: Path) -> None:
    rows = bench_mfu.main(["--smoke", "--steps", "8", "--cache", str(tmp_path / "cache"), "--set", "data.seq_len=24"])
    assert [r["name"] for r in rows] == ["baseline", "batch8"]
    assert all(0 < r["mfu"] < 1 and r["steps"] == 8 for r in rows)
    assert rows[0]["tokens_seen"] == 8 * 4 * 24  # --set reached the run: 8 steps x batch 4 x 24 tokens
    assert rows[1]["tokens_seen"] == 2 * rows[0]["tokens_seen"]  # batch 8 against batch 4
    assert all(0 < r["plan_bytes"] < r["peak_memory_bytes"] for r in rows)  # the CPU peak includes the interpreter
    assert rows[1]["plan_bytes"] > rows[0]["plan_bytes"], "a larger micro-batch keeps more activations"
    out = capsys.readouterr().out
    assert "1.00x" in out and "batch8" in out and "plan/peak" in out
    assert len([d for d in (tmp_path / "cache").iterdir() if d.is_dir()]) >= 1, "the prepared data stays for the next call"


def test_gpu_variants_compose_the_issue_models() -> None:
    from hydra import compose, initialize_config_dir

    for name, overrides in bench_mfu.VARIANTS.items():
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        assert cfg.model.attention.name == "causal" and cfg.trainer.accelerator == "gpu", name
        assert cfg.data.seq_len == 2048 and cfg.model.d_model in (1024, 2048), name
    with pytest.raises(SystemExit, match="unknown variant"):
        bench_mfu.main(["--only", "nope"])


def test_a_failed_run_reports_its_exception_not_hydras_hint() -> None:
    stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
              "RuntimeError: kernel=xformers runs only on CUDA tensors\n\n"
              "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n")
    assert bench_mfu.last_error_line(stderr) == "RuntimeError: kernel=xformers runs only on CUDA tensors"
    assert bench_mfu.last_error_line("Killed\n") == "Killed" and bench_mfu.last_error_line("") == "failed"

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
def test_smoke_sweep_reports_mfu_per_variant(capsys) -> None:
    rows = bench_mfu.main(["--smoke", "--steps", "8"])
    assert [r["name"] for r in rows] == ["baseline", "batch8"]
    assert all(0 < r["mfu"] < 1 and r["steps"] == 8 for r in rows)
    assert rows[1]["tokens_seen"] == 2 * rows[0]["tokens_seen"]  # batch 8 against batch 4
    out = capsys.readouterr().out
    assert "1.00x" in out and "batch8" in out


def test_gpu_variants_compose_the_issue_model() -> None:
    assert "model=gqa_rope" in bench_mfu.MODEL and all("trainer=" in " ".join(v) for v in bench_mfu.VARIANTS.values())
    with pytest.raises(SystemExit, match="unknown variant"):
        bench_mfu.main(["--only", "nope"])

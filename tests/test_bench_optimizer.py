"""scripts/bench_optimizer.py: the four set-ups run and print side by side (tiny, fast)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_optimizer", ROOT / "scripts" / "bench_optimizer.py")
bench_optimizer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_optimizer)


def test_plain_and_fsdp_parameters_with_both_adamw_kinds(capsys) -> None:
    rows = bench_optimizer.main(["--layers", "2", "--repeats", "3"])
    assert [(r[0], r[1]) for r in rows] == [
        ("plain", "foreach"), ("plain", "fused"), ("FSDP2 (DTensor)", "foreach"), ("FSDP2 (DTensor)", "fused"),
    ]
    assert len({r[2] for r in rows}) == 1, "the same parameter tensors in every row"
    assert all(r[3] > 0 and r[4] > 0 for r in rows)
    assert "1.00x" in capsys.readouterr().out

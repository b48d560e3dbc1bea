"""scripts/bench_host_overhead.py: every set-up runs and prints side by side (tiny, fast)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_host_overhead", ROOT / "scripts" / "bench_host_overhead.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_optimizer_forward_backward_and_provider_rows(capsys) -> None:
    results = bench.main(["--layers", "2", "--repeats", "3"])
    rows = results["optimizer"]
    assert [(r[0], r[1]) for r in rows] == [
        ("plain", "foreach"), ("plain", "fused"), ("FSDP2 (DTensor)", "foreach"), ("FSDP2 (DTensor)", "fused"),
    ]
    assert len({r[2] for r in rows}) == 1, "the same parameter tensors in every row"
    assert all(r[3] > 0 and r[4] > 0 for r in rows)
    assert [label for label, _ in results["forward_backward"]] == [
        "plain", "FSDP2 reshard=default", "FSDP2 reshard=never", "FSDP2 reshard=always",
        "FSDP2 2 blocks per unit", "FSDP2 4 blocks per unit",
    ]
    assert [label for label, _ in results["providers"]] == ["scan every module", "kept lists"]
    assert all(ms > 0 for key in ("forward_backward", "providers") for _, ms in results[key])
    assert "1.00x" in capsys.readouterr().out

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """gpu tests skip without CUDA; slurm tests skip without a reachable SLURM cluster."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_slurm = pytest.mark.skip(reason="needs a SLURM cluster (slurm/local-cluster.sh up)")
    have_slurm = _slurm_answers() and os.environ.get("LLMKIT_NO_SLURM") is None
    for item in items:
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if item.get_closest_marker("slurm") and not have_slurm:
            item.add_marker(no_slurm)


def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(autouse=True)
def _fixed_threads() -> None:
    torch.manual_seed(0)

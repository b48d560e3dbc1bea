import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# a run of seconds: 4 steps on 60 kB of the default corpus (add hydra.run.dir and data.cache_dir)
TINY_RUN = ["debug=fast", "data.max_bytes=60000", "data.split=tail", "data.vocab_size=400", "data.seq_len=32",
            "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.enable_progress_bar=false",
            "sample.max_new_tokens=4"]


@pytest.hookimpl(trylast=True)  # after -m has deselected: the default run never asks SLURM anything
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """gpu tests skip without CUDA; slurm tests skip without a reachable SLURM cluster."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_slurm = pytest.mark.skip(reason="needs a SLURM cluster (slurm/local-cluster.sh up)")
    slurm_items = [item for item in items if item.get_closest_marker("slurm")]
    # sinfo waits ~10 s for a controller that is not there: asked only when a SLURM test was selected
    have_slurm = bool(slurm_items) and os.environ.get("LLMKIT_NO_SLURM") is None and _slurm_answers()
    for item in items:
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_gpu)
    for item in slurm_items:
        if not have_slurm:
            item.add_marker(no_slurm)


def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step gqa_rope checkpoint with a sentencepiece tokenizer, trained once per test session, in this
    process (generate, evaluate, export, serve and post-training tests then run on it; the console script
    itself starts in tests/test_cli.py, and trains in the extended run)."""
    from llmkit.cli import main as llmkit

    tmp = tmp_path_factory.mktemp("tiny_checkpoint")
    llmkit(["train", f"hydra.run.dir={tmp / 'run'}", f"data.cache_dir={tmp / 'cache'}", *TINY_RUN, "model=gqa_rope",
            "model.d_model=64", "model.n_layers=2", "model.n_heads=4"])
    return tmp / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(autouse=True)
def _fixed_threads():
    """Seeded, and no test may leave another thread count behind: later runs in this process would sum
    in another order than a fresh process and stop matching it bit for bit (it happened once)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    assert torch.get_num_threads() == threads, f"the test left torch at {torch.get_num_threads()} threads (was {threads})"


@pytest.fixture(autouse=True)
def _no_rendezvous_settings_leak():
    """A test that leaves MASTER_PORT (or MASTER_ADDR) in this process's environment hands it to
    every later training subprocess, whose ranks then meet on a port something may still hold."""
    before = {k: os.environ.get(k) for k in ("MASTER_PORT", "MASTER_ADDR")}
    yield
    after = {k: os.environ.get(k) for k in before}
    assert after == before, f"the test left rendezvous settings behind: {after} (was {before})"

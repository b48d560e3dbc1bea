"""A checkpoint written by train.py loads with weights_only=True, with its tokenizer."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkit.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ckpt")
    cmd = [
        sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp / 'run'}", f"data.cache_dir={tmp / 'cache'}",
        "data.max_bytes=60000", "data.split=tail", "data.vocab_size=400", "data.seq_len=32", "trainer.max_steps=4",
        "trainer.val_check_interval=4", "trainer.enable_progress_bar=false", "sample.max_new_tokens=4",
        "model=gqa_rope", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    return tmp / "run" / "checkpoints" / "last.ckpt"


def test_checkpoint_loads_model_and_tokenizer_without_unpickling(trained: Path) -> None:
    loaded = load_checkpoint(trained)  # weights_only=True inside: fails if anything needs unpickling
    assert loaded.step == 4
    assert loaded.model.cfg.vocab_size == loaded.tokenizer.vocab_size
    assert loaded.model.cfg.position["name"] == "rope"
    raw = torch.load(trained, weights_only=True)
    assert torch.equal(loaded.model.head.weight, raw["state_dict"]["model.head.weight"])
    text = "def main():\n    return 1\n"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == text


def test_bad_checkpoint_paths_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "sharded.ckpt").mkdir()
    with pytest.raises(ValueError, match="sharded"):
        load_checkpoint(tmp_path / "sharded.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not an llmkit checkpoint"):
        load_checkpoint(tmp_path / "other.ckpt")

"""A checkpoint written by train.py loads with weights_only=True, with its tokenizer."""

from pathlib import Path

import pytest
import torch

from llmkit.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def trained(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


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

"""`llmkit export` and `llmkit import` (in this process) on a checkpoint with a sentencepiece tokenizer:
transformers reads model and tokenizer (same logits, same ids), and the imported checkpoint is the original."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmkit.checkpoint import load_checkpoint
from llmkit.cli import main as llmkit
from llmkit.text.tokenizer import SentencePieceTokenizer
from tests.model.helpers import tiny_model

transformers = pytest.importorskip("transformers")
TEXT = "def main():\n    return 1\n\nclass Point:\n    x: int = 0\n\n" * 20 + "The quick brown fox, 3 times.\n\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = SentencePieceTokenizer.train([TEXT], 300)
    model = tiny_model(vocab_size=tok.vocab_size, norm={"name": "rmsnorm"}, position={"name": "rope"},
                       ffn={"name": "swiglu"}, attention={"name": "causal", "n_kv_heads": 2}, tie_embeddings=False)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.save({"model_config": model.cfg.to_dict(), "global_step": 3,
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "LMDataModule": {"tokenizer": tok.to_state()}}, path)
    return path


@pytest.mark.slow
def test_export_then_import_scripts(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    llmkit(["export", f"ckpt={ckpt}", f"out={out}"])  # in this process; tests/test_cli.py runs the console script
    loaded = load_checkpoint(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in ["def main():\n    return 1\n", "  Hello,  world\n\n\tx = 3 é"]:
        ids = loaded.tokenizer.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids
        assert hf_tok.decode(ids) == loaded.tokenizer.decode(ids)
    ids = torch.tensor([loaded.tokenizer.encode(TEXT[:200])[:24]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, loaded.model(ids), rtol=1e-5, atol=1e-5)

    back_path = tmp_path / "imported.ckpt"
    llmkit(["import", f"hf={out}", f"out={back_path}"])
    back = load_checkpoint(back_path)
    assert back.model.cfg == loaded.model.cfg and back.tokenizer.fingerprint == loaded.tokenizer.fingerprint
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), back.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_unexportable_checkpoint_fails_with_the_part(tmp_path: Path) -> None:
    model = tiny_model(block={"name": "post_ln"}, position={"name": "alibi"})
    path = tmp_path / "post_ln.ckpt"
    torch.save({"model_config": model.cfg.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    with pytest.raises(SystemExit) as stop:
        llmkit(["export", f"ckpt={path}", f"out={tmp_path / 'hf'}"])
    assert "block=post_ln has no Hugging Face equivalent" in str(stop.value.code) and "position=alibi" in str(stop.value.code)
    assert not (tmp_path / "hf").exists()

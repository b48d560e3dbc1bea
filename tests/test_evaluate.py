"""Strided sliding-window perplexity equals a direct token-by-token computation; evaluate.py writes it as JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmkit.cli import main as llmkit
from llmkit.data.shards import MANIFEST, MANIFEST_FORMAT, VERSION, write_shard
from llmkit.evaluate import perplexity, windows
from llmkit.model import Transformer
from llmkit.text.tokenizer import CharTokenizer
from tests.model.helpers import tiny_model


def direct_nll(model: Transformer, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """Each target t scored alone: its window ends at the first window end e >= t, so its left context is
    ids[max(0, e - context):t] (the model is causal, so the rest of the window does not matter)."""
    ends, end = [], min(context, len(ids) - 1)
    ends.append(end)
    while end < len(ids) - 1:
        end = min(end + stride, len(ids) - 1)
        ends.append(end)
    total = 0.0
    for t in range(1, len(ids)):
        e = next(e for e in ends if e >= t)
        logits = model(ids[max(0, e - context) : t][None])[0, -1]
        total -= F.log_softmax(logits.double(), dim=-1)[ids[t]].item()
    return total, len(ids) - 1


@pytest.mark.parametrize(("n", "context", "stride"), [(50, 24, 24), (50, 24, 10), (50, 16, 1), (61, 24, 7), (10, 24, 12)])
@pytest.mark.parametrize("model_kind", ["gpt", "rope_moe"])
def test_sliding_window_matches_direct_computation(n: int, context: int, stride: int, model_kind: str) -> None:
    overrides = {} if model_kind == "gpt" else dict(position={"name": "rope"}, ffn={"name": "moe", "n_experts": 4})
    model = tiny_model(**overrides)
    ids = torch.randint(0, model.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        total, count = direct_nll(model, ids, context, stride)
    result = perplexity(model, ids, context=context, stride=stride, batch_size=3)
    assert result.tokens == count == n - 1
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_windows_score_every_target_once() -> None:
    for n, context, stride in [(100, 32, 32), (100, 32, 5), (33, 32, 16), (5, 32, 1), (2, 4, 4)]:
        scored = [t for b, e, first in windows(n, context, stride) for t in range(first, e + 1)]
        assert scored == list(range(1, n))
        assert all(e - b <= context and b <= first - 1 for b, e, first in windows(n, context, stride))
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 5)


def _checkpoint(tmp_path: Path) -> tuple[Path, Transformer, CharTokenizer]:
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz \n")
    model = tiny_model(vocab_size=tok.vocab_size)
    path = tmp_path / "model.ckpt"
    torch.save({"model_config": model.cfg.to_dict(), "global_step": 7,
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "LMDataModule": {"tokenizer": tok.to_state()}}, path)
    return path, model, tok


def test_evaluate_command_on_a_text_file_writes_json(tmp_path: Path) -> None:
    ckpt, model, tok = _checkpoint(tmp_path)
    text = "the quick brown fox jumps over the lazy dog\n" * 3
    (tmp_path / "held_out.txt").write_text(text)
    out = tmp_path / "eval.json"
    llmkit(["evaluate", f"ckpt={ckpt}", f"text={tmp_path / 'held_out.txt'}", "stride=5", f"out={out}"])
    report = json.loads(out.read_text())
    ids = torch.tensor(tok.encode(text))
    with torch.no_grad():
        total, count = direct_nll(model, ids, model.cfg.max_seq_len, 5)
    assert report["tokens"] == count and report["step"] == 7
    assert report["nll"] == pytest.approx(total / count, rel=1e-5)
    assert report["ppl"] == pytest.approx(math.exp(report["nll"]))


def test_evaluate_command_on_a_prepared_dataset(tmp_path: Path) -> None:
    ckpt, model, tok = _checkpoint(tmp_path)
    cache = tmp_path / "dataset"
    (cache / "main").mkdir(parents=True)
    (cache / "tokenizer").mkdir()
    tok.save(cache / "tokenizer")
    ids = np.random.default_rng(0).integers(0, tok.vocab_size, 80).astype(np.uint16)
    entry = write_shard(cache / "main" / "val_00000.bin", ids, np.zeros(1, np.uint64))
    entry["file"] = "main/val_00000.bin"
    split = {"tokens": 80, "documents": 1, "shards": [entry]}
    manifest = {
        "format": MANIFEST_FORMAT, "version": VERSION, "dtype": "uint16", "vocab_size": tok.vocab_size,
        "tokenizer_fingerprint": tok.fingerprint, "tokenizer_dir": "tokenizer",
        "components": {"main": {"weight": 1.0, "splits": {"val": split}}},
    }
    (cache / MANIFEST).write_text(json.dumps(manifest))
    llmkit(["evaluate", f"ckpt={ckpt}", f"dataset={cache}", "max_tokens=60", "context=16"])
    report = json.loads(Path(f"{ckpt}.eval.json").read_text())  # next to the checkpoint by default
    expected = perplexity(model, torch.from_numpy(ids[:60].astype(np.int64)), context=16, stride=8)
    assert report["tokens"] == 59 and report["nll"] == pytest.approx(expected.nll, rel=1e-6)
    with pytest.raises(SystemExit, match="exactly one"):
        llmkit(["evaluate", f"ckpt={ckpt}"])

"""After fit, the end-of-run sample runs on the device the model trained on."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

import llmkit.train as train_module
from llmkit.lit.module import LitLM
from llmkit.text.tokenizer import CharTokenizer

MODEL = dict(vocab_size=3, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)


def test_sample_moves_the_model_to_the_training_device_first(monkeypatch) -> None:
    """Lightning's single-device and DDP teardown leaves the model on the CPU; the sample must not run
    there on a GPU run (a CUDA-only kernel fails, compiled blocks recompile, a large model crawls).
    No GPU here, so this checks the move to the strategy's device happens before sampling."""
    events = []
    real_to, real_sample = LitLM.to, train_module.sample
    monkeypatch.setattr(LitLM, "to", lambda self, device: events.append(("to", device)) or real_to(self, device))
    monkeypatch.setattr(train_module, "sample", lambda *args: events.append(("sample",)) or real_sample(*args))
    lit = LitLM(model=MODEL, optim={"name": "adamw", "lr": 1e-3}, scheduler={"name": "constant"})
    lit.configure_model()
    cfg = OmegaConf.create({"seed": 0, "sample": {"prompt": "ab", "max_new_tokens": 3, "temperature": 1.0, "top_k": None}})
    text = train_module._sample(cfg, lit, SimpleNamespace(tokenizer=CharTokenizer("ab")), torch.device("cpu"))
    assert events == [("to", torch.device("cpu")), ("sample",)]
    assert len(text) == 5 and text.startswith("ab")

"""Tiny models for component tests: small enough that every combination builds in milliseconds."""

from __future__ import annotations

import torch

from llmkit.model import ModelConfig, Transformer

VOCAB = 37


def tiny_config(**overrides: object) -> ModelConfig:
    values: dict[str, object] = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=24)
    values.update(overrides)
    return ModelConfig(**values)


def tiny_model(seed: int = 0, **overrides: object) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides)).eval()
    for p in model.parameters():  # init leaves biases and T5 tables near zero: make every path matter
        with torch.no_grad():
            p.add_(0.05 * torch.randn_like(p))
    return model

"""What post-training needs to know of the model it starts from (`init_from=`: a llmkit checkpoint or a Hugging
Face directory, loaded by llmkit/checkpoint.py's `load_base`): its config and tokenizer without the weights,
and a vocabulary grown for added special tokens.

Weights only: the optimizer, schedule and data position start fresh (resuming a post-training run is
`ckpt_path=` / `resume=auto`, as for pre-training). The tokenizer comes with the weights, and the
post-training data is rendered with it, so they cannot disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmkit.checkpoint import load_base
from llmkit.model import ModelConfig, Transformer
from llmkit.text.tokenizer import Tokenizer


@torch.no_grad()
def resize_vocabulary(model: Transformer, vocab_size: int) -> Transformer:
    """Grow the token embedding (and an untied head) to vocab_size rows, in place: the old rows keep
    their values, new ones start at the mean of the old (a token the model has never seen then looks
    like an average one, not like noise). For special tokens added to an existing vocabulary."""
    from dataclasses import replace

    old = model.tok_emb.weight
    if vocab_size <= old.size(0):
        return model
    grown = torch.nn.Embedding(vocab_size, old.size(1), device=old.device, dtype=old.dtype)
    grown.weight[: old.size(0)] = old
    grown.weight[old.size(0) :] = old.mean(dim=0)
    model.tok_emb = grown
    if model.cfg.tie_embeddings:
        model.head.weight = grown.weight
    else:
        head = torch.nn.Linear(old.size(1), vocab_size, bias=False, device=old.device, dtype=old.dtype)
        head.weight[: old.size(0)] = model.head.weight
        head.weight[old.size(0) :] = model.head.weight.mean(dim=0)
        model.head = head
    model.cfg = replace(model.cfg, vocab_size=vocab_size)
    return model


def base_config(init_from: str | Path) -> ModelConfig:
    """The base model's config without building it (for the data's default context)."""
    path = Path(init_from).expanduser()
    if path.is_dir():
        import json

        from llmkit.hf import LLMKIT_CONFIG_KEY

        config = json.loads((path / "config.json").read_text())
        if LLMKIT_CONFIG_KEY in config:
            return ModelConfig.from_dict(config[LLMKIT_CONFIG_KEY])
        return load_base(path)[0].cfg
    return ModelConfig.from_dict(_checkpoint(path)["model_config"])


def base_tokenizer(init_from: str | Path) -> Tokenizer:
    path = Path(init_from).expanduser()
    if path.is_dir():
        return load_base(path)[1]
    from llmkit.checkpoint import tokenizer_state
    from llmkit.text.tokenizer import tokenizer_from_state

    state = tokenizer_state(_checkpoint(path))
    if state is None:
        raise ValueError(f"init_from={init_from} holds no tokenizer, so post-training data cannot be encoded for it")
    return tokenizer_from_state(state)


def _checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"init_from={path}: no such checkpoint file (or Hugging Face directory with config.json)")
    # memory-mapped: the config and tokenizer are read without reading the weights (the datamodule and the
    # planner ask before the model is built; a large base would otherwise be read whole each time)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)

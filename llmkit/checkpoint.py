"""Load a trained model and its tokenizer from a Lightning checkpoint, without unpickling
arbitrary objects (`torch.load(weights_only=True)`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmkit.data.tokenizer import Tokenizer, tokenizer_from_state
from llmkit.model import ModelConfig, Transformer

_DATA_STATE = "LMDataModule"


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer | None
    step: int
    checkpoint: dict[str, Any]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Loaded:
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a sharded (distributed) checkpoint directory; load it in a run with the same strategy "
            "(ckpt_path=...), or consolidate it into a single file first"
        )
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if "model_config" not in checkpoint:
        raise ValueError(f"{path} is not an llmkit checkpoint (it has no 'model_config')")
    model = Transformer(ModelConfig.from_dict(checkpoint["model_config"]))
    prefix = "model."
    weights = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(weights)
    data_state = checkpoint.get(_DATA_STATE, {})
    tokenizer = tokenizer_from_state(data_state["tokenizer"]) if "tokenizer" in data_state else None
    return Loaded(model.eval(), tokenizer, int(checkpoint.get("global_step", 0)), checkpoint)

"""Load a trained model and its tokenizer from a Lightning checkpoint, without unpickling
arbitrary objects (`torch.load(weights_only=True)`); an adapter checkpoint is loaded onto the base it
names and merged. Loading imports no training package (llmkit/posttrain, llmkit/lit): tests/test_structure.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmkit.adapters.lora import ADAPTER_PARAMS, LoraConfig, apply_lora, load_lora_state_dict, merge_lora, strip_merged
from llmkit.model import ModelConfig, Transformer
from llmkit.text.tokenizer import Tokenizer, tokenizer_from_state

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
            f"{path} is a sharded (distributed) checkpoint directory; resume it with ckpt_path=... in a sharded run, "
            f"or make a single file for inference: llmkit consolidate ckpt={path} out=out.ckpt"
        )
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if "model_config" not in checkpoint:
        raise ValueError(f"{path} is not an llmkit checkpoint (it has no 'model_config')")
    if "lora" in checkpoint:  # an adapter checkpoint: its base, the adapters, merged (llmkit/adapters/lora.py)
        model = merged_from_adapter_checkpoint(checkpoint, map_location)
    else:
        prefix = "model."
        model = Transformer(ModelConfig.from_dict(checkpoint["model_config"]))
        model.load_state_dict({k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)})
    state = tokenizer_state(checkpoint)
    tokenizer = tokenizer_from_state(state) if state is not None else None
    return Loaded(model.eval(), tokenizer, int(checkpoint.get("global_step", 0)), checkpoint)


def tokenizer_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The tokenizer a datamodule saved in the checkpoint (pre-training's LMDataModule, or a
    post-training datamodule: Lightning keys each by its class name)."""
    for key in (_DATA_STATE, *sorted(checkpoint)):
        state = checkpoint.get(key)
        if isinstance(state, dict) and isinstance(state.get("tokenizer"), dict) and "kind" in state["tokenizer"]:
            return state["tokenizer"]
    return None


def load_base(init_from: str | Path, map_location: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer]:
    """(model in train mode, tokenizer) from a llmkit checkpoint file or a Hugging Face directory."""
    path = Path(init_from).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        from llmkit.hf import import_hf

        model, tokenizer = import_hf(path)
    else:
        from llmkit.checkpoint import load_checkpoint

        loaded = load_checkpoint(path, map_location=map_location)
        model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise ValueError(f"init_from={init_from} holds no tokenizer, so post-training data cannot be encoded for it")
    return model.train(), tokenizer


def adapted_from_checkpoint(checkpoint: dict, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """A LoRA run's checkpoint holds the adapters and names its base (`checkpoint["lora"]`): the base
    model with those adapters on (not merged), as the run trained it. A QLoRA run's also records how its
    base was quantized (`"quant"`): the base is quantized the same way again and must give the same codes."""
    info = checkpoint["lora"]
    model, _ = load_base(info["base"], map_location)
    if "quant" in info:
        from llmkit.adapters.qlora import QuantConfig, apply_qlora, check_fingerprint

        apply_qlora(model, LoraConfig(**info["config"]), QuantConfig(**info["quant"]["config"]))
        check_fingerprint(model, info["quant"], info["base"])
    else:
        apply_lora(model, LoraConfig(**info["config"]))
    prefix = "model."
    adapters = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items()
                if k.startswith(prefix) and k.endswith(ADAPTER_PARAMS)}
    load_lora_state_dict(model, adapters)
    return model.eval()


def merged_from_adapter_checkpoint(checkpoint: dict, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The same, merged into plain Linear layers: for inference, quantization and export. A QLoRA base is
    dequantized first, so the merged weights are the dequantized base plus the adapters' delta: the function
    the adapters were trained with (not the full-precision base plus the delta)."""
    from llmkit.adapters.qlora import dequantize_model

    model = adapted_from_checkpoint(checkpoint, map_location)
    dequantize_model(model)  # nothing to do after plain LoRA
    merge_lora(model, keep_original=False)
    strip_merged(model)
    return model


def load_for_inference(
    path: str | Path, device: str | torch.device = "cpu", quantize: str | None = None, backend: str = "auto"
) -> Loaded:
    """A checkpoint file, or a directory written by `llmkit quantize`, ready to generate from.
    quantize=int8 quantizes a float checkpoint's block Linears on load (llmkit/quantize.py)."""
    from llmkit import quantize as int8

    if quantize not in (None, "none", "int8"):
        raise ValueError(f"quantize={quantize} is not supported; use quantize=int8 or leave it null")
    if Path(path).is_dir() and int8.is_quantized_dir(path):
        model, tokenizer, config = int8.load_quantized(path, backend, device)
        return Loaded(model, tokenizer, int(config.get("step", 0)), config)
    loaded = load_checkpoint(path, map_location=device)
    if quantize == "int8":
        int8.quantize_model(loaded.model, backend)
    return loaded


def consolidate(sharded_dir: str | Path, out_file: str | Path) -> Path:
    """Merge a sharded checkpoint directory (FSDP, ModelParallelStrategy) into one file for
    inference: full model weights plus the run's metadata (model config, tokenizer, step); the
    optimizer state is left out. Written atomically, so a crash never leaves a partial file."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    sharded_dir, out_file = Path(sharded_dir), Path(out_file)
    if not (sharded_dir / ".metadata").exists() or not (sharded_dir / "meta.pt").exists():
        raise ValueError(f"{sharded_dir} is not a complete sharded checkpoint (needs .metadata and meta.pt)")
    tmp = out_file.with_name(out_file.name + ".tmp")
    dcp_to_torch_save(sharded_dir, tmp)  # every shard gathered into full tensors
    shards = torch.load(tmp, map_location="cpu", weights_only=True)
    checkpoint = torch.load(sharded_dir / "meta.pt", map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = shards["state_dict"]
    torch.save(checkpoint, tmp)
    tmp.replace(out_file)
    return out_file

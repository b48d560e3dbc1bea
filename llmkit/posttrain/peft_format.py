"""llmkit LoRA adapters in PEFT's format, for a base exported by llmkit/hf.py:

    export_hf(model, tokenizer, "base/")              # the frozen base, as LlamaForCausalLM
    save_peft_adapter(model, tokenizer, "adapter/")   # adapter_config.json + adapter_model.safetensors
    # transformers + peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base/"), "adapter/")

Keys are `base_model.model.<HF module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), as
peft 0.21 saves a LoraModel of a LlamaForCausalLM. The HF module of each llmkit module comes from
hf.py's own tables (`name_pairs`, `export_qkv`), so the base and its adapter are named by one mapping.

Fused projections: llmkit's `wqkv` (rows q | k | v) is three HF modules. B's rows are the weight's rows,
so B is split exactly as hf.py splits the weight, and each piece keeps the whole A:
scale * B_q @ A is exactly the q rows of scale * B @ A. Each piece is a rank-r adapter with the same
alpha, so PEFT computes the same scale. llmkit's SwiGLU keeps gate and up as separate Linears: one to one.
A head tied to the embedding is still an `lm_head` module in transformers, which peft adapts (it warns that
merging there is delicate; llmkit's merge_lora refuses it).

A QLoRA model (llmkit/adapters/qlora.py) exports the same way: its QLoraLinear layers are LoraLinear layers
whose frozen weight is stored quantized, and the adapter tensors are the trained ones, unchanged. peft puts them
on the full-precision base (the weights differ from the dequantized ones by the quantization error).

Only llama is supported: GPT-2 fuses c_attn in a transposed Conv1D on the Hugging Face side too, and
Mixtral's experts are stacked parameters that LoRA does not adapt here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from llmkit.adapters.lora import LoraConfig, LoraLinear, lora_layers
from llmkit.hf import ExportError, export_qkv, hf_architecture, name_pairs, save_tokenizer
from llmkit.model import ModelConfig, Transformer
from llmkit.text.tokenizer import Tokenizer

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def save_peft_adapter(
    model: Transformer, tokenizer: Tokenizer | None, out_dir: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter directory (and the tokenizer, if given); returns
    out_dir. base_model_name_or_path is recorded for peft's AutoPeftModel (where export_hf wrote the base)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    config = peft_config(model, base_model_name_or_path)  # fails before anything is written
    tensors = peft_state_dict(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir)
    return out_dir


def peft_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The adapters under PEFT's names (contiguous copies, ready for safetensors)."""
    layers = _llama_lora_layers(model)
    pieces = hf_pieces(model.cfg, {name: m.lora_B for name, m in layers})
    out: dict[str, Tensor] = {}
    for name, m in layers:
        for hf, b in pieces[name].items():
            out[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = m.lora_A  # shared by q, k and v: see the module docstring
            out[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = b
    return {k: v.detach().contiguous().clone() for k, v in out.items()}  # own storage: safetensors refuses shared


def peft_config(model: Transformer, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """adapter_config.json's fields (peft fills the rest with its defaults)."""
    layers = _llama_lora_layers(model)
    cfg = _one_config(layers)
    linears = {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    every = {hf for pieces in hf_pieces(model.cfg, linears).values() for hf in pieces}
    adapted = {hf for pieces in hf_pieces(model.cfg, {n: m.lora_B for n, m in layers}).values() for hf in pieces}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora, "target_modules": target_modules(every, adapted), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }


def hf_pieces(cfg: ModelConfig, rows: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """llmkit Linear name -> a tensor with its weight's rows (the weight, or a LoRA B) to the Hugging Face
    llama modules it becomes -> their rows, exactly as hf.py exports the weight."""
    # llama stores no weight transposed (only GPT-2's Conv1D does), so rows stay rows
    table = {ours.removesuffix(".weight"): hf.removesuffix(".weight")
             for ours, hf, transposed in name_pairs(cfg, "llama") if ours.endswith(".weight") and not transposed}
    table.setdefault("head", "lm_head")  # tied: no tensor of its own in the export, but still a module peft adapts
    fused = {f"blocks.{i}.attention.wqkv": (f"blocks.{i}.", f"model.layers.{i}.") for i in range(cfg.n_layers)}
    out: dict[str, dict[str, Tensor]] = {}
    for name, t in rows.items():
        if name in table:
            out[name] = {table[name]: t}
        elif name in fused:
            split: dict[str, Tensor] = {}
            export_qkv({f"{name}.weight": t}, split, cfg, *fused[name])  # q, k, v rows under HF names
            out[name] = {hf.removesuffix(".weight"): part for hf, part in split.items()}
        else:
            raise ExportError(f"{name} has no Hugging Face llama equivalent")
    return out


def target_modules(every: set[str], adapted: set[str]) -> list[str]:
    """PEFT adapts a module whose name equals a target or ends with '.' + target: a leaf name (q_proj)
    where every module with that leaf is adapted, else the full names, so peft adapts exactly these."""
    leaf = lambda name: name.rpartition(".")[2]
    out = {leaf(name) if {n for n in every if leaf(n) == leaf(name)} <= adapted else name for name in adapted}
    return sorted(out)


def _llama_lora_layers(model: Transformer) -> list[tuple[str, LoraLinear]]:
    family = hf_architecture(model.cfg)
    if family != "llama":
        raise ExportError(f"PEFT adapters are exported for llama models only; this model maps to {family}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters (call apply_lora first)")
    return layers


def _one_config(layers: list[tuple[str, LoraLinear]]) -> LoraConfig:
    """adapter_config.json has one r, alpha and dropout (rank_pattern aside): every adapter must share them."""
    configs = {(m.lora_config.r, m.lora_config.alpha, m.lora_config.dropout, m.lora_config.rslora) for _, m in layers}
    if len(configs) > 1:
        raise ExportError(f"the adapters differ in (r, alpha, dropout, rslora): {sorted(configs)}; PEFT export needs one")
    return layers[0][1].lora_config

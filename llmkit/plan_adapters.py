"""What a post-training run changes in a plan (llmkit/plan.py): adapters, a quantized base, the base's loading.

finetune=lora | qlora (llmkit/adapters) is applied to the planned meta model as training applies it
(llmkit/lit/module.py): LoRA freezes the base and adds trainable A (r, in) and B (out, r); QLoRA also stores
every frozen Linear its `quantize` patterns match as codes and scales (buffers, counted with the weights:
4 bits a weight plus the scales under NF4), the embeddings and the head as they were. So gradients and AdamW
states exist for the adapters alone, and the step's trace runs QLoRA's own forward and backward on meta
tensors: the weight it dequantizes for each matmul (in forward, and again in backward) is a live tensor of
the trace like any other, alive until the matmul drops it.

A run with init_from has a phase before its first step whose peak a frozen base can exceed: loading reads
the whole checkpoint file into memory (torch.load, weights and any optimizer states it holds) and builds
the full-precision model beside it (llmkit/checkpoint.py load_checkpoint); the file's tensors are freed once
the weights are copied, and only then does QLoRA quantize. `load_peak` gives that point.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

FULL = {"name": "full"}


def finetune_options(cfg: Any) -> dict[str, Any]:
    """finetune=full | lora | qlora and its options, from a composed train config."""
    from omegaconf import OmegaConf

    finetune = cfg.get("finetune")
    return dict(OmegaConf.to_container(finetune, resolve=True)) if finetune is not None else dict(FULL)


def _lora(model: nn.Module, options: dict[str, Any]) -> None:
    from llmkit.adapters.lora import LoraConfig, apply_lora

    apply_lora(model, LoraConfig(**{k: (list(v) if k == "targets" else v) for k, v in options.items()}))


def _qlora(model: nn.Module, options: dict[str, Any]) -> None:
    from llmkit.adapters.qlora import apply_qlora, qlora_configs

    apply_qlora(model, *qlora_configs(options))  # quantizing meta weights makes meta codes and scales: no memory


# finetune name -> what it does to the base model (llmkit/lit/module.py _apply_adapters, without the checkpoint
# record, whose fingerprint reads the codes' values)
ADAPTERS: dict[str, Callable[[nn.Module, dict[str, Any]], None]] = {"full": lambda model, options: None,
                                                                    "lora": _lora, "qlora": _qlora}


def apply_finetune(model: nn.Module, finetune: dict[str, Any]) -> None:
    name = finetune.get("name", "full")
    if name not in ADAPTERS:
        raise ValueError(f"finetune={name}: valid values are {', '.join(ADAPTERS)}")
    ADAPTERS[name](model, {k: v for k, v in finetune.items() if k != "name"})


def quantized_tensors(model: nn.Module) -> list[Any]:
    """The codes and scales of every quantized Linear (buffers that hold the frozen base's weights)."""
    from llmkit.adapters.qlora import quantized_layers

    return [t for _, layer in quantized_layers(model) for t in layer.quantized_tensors().values()]


def quantized_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in quantized_tensors(model))


def describe_finetune(finetune: dict[str, Any], trainable: int, total: int, quantized: int) -> str:
    """One line of the plan's table: what trains, and how the frozen base is held."""
    name = finetune.get("name", "full")
    if name == "full":
        return f"fine-tuning: full (every parameter trains: {trainable:,})"
    line = (f"fine-tuning: {name} (r={finetune.get('r')}, targets {', '.join(finetune.get('targets', []))}): "
            f"{trainable:,} trainable adapter parameters ({trainable / max(1, total):.3%}), the base frozen")
    if name == "qlora":
        line += (f"; its Linears stored as {finetune.get('quant_type')} codes + scales (block "
                 f"{finetune.get('block_size')}, double_quant={finetune.get('double_quant')}): "
                 f"{quantized / 2**30:.3f} GiB, dequantized one matmul at a time")
    return line


def base_file_bytes(init_from: str | None) -> int:
    """Bytes that loading init_from reads into memory: the checkpoint file (weights, and the optimizer states
    a training checkpoint also holds), or a Hugging Face directory's weight files. 0 without init_from."""
    if not init_from:
        return 0
    path = Path(init_from).expanduser()
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    return path.stat().st_size if path.is_file() else 0


def load_peak(base_model: nn.Module, file_bytes: int) -> dict[str, int]:
    """The tensors alive while a run loads its base: the file's tensors and the full-precision model built
    beside them (float32: Transformer's default dtype, shared tensors once)."""
    weights = sum(p.numel() * 4 for p in base_model.parameters())
    return {"checkpoint": file_bytes, "weights": weights}


def reference_copy_bytes(base_model: nn.Module, run_model: nn.Module, finetune: dict[str, Any], size: int) -> int:
    """DPO's task.reference=copy (llmkit/posttrain/objectives.py ReferenceCopy), held beside the policy: the base
    copied when the objective is attached, in float32 (outside the module tree, the precision plugin never
    converts it); under qlora the adapted model copied at fit start, so its quantized base, in the run's
    parameter dtype (`size` bytes) beside its codes and scales."""
    if finetune.get("name") == "qlora":
        return sum(p.numel() for p in run_model.parameters()) * size + quantized_bytes(run_model)
    return sum(p.numel() for p in base_model.parameters()) * 4


def lighter_runs(setup: Any) -> list[tuple[str, Any]]:
    """Post-training changes that shrink a run's states (for the pre-flight's suggestions): QLoRA's base in
    place of LoRA's, and log-probabilities precomputed in place of a reference model."""
    from dataclasses import asdict, replace

    from llmkit.adapters.qlora import QuantConfig

    changes = []
    if setup.finetune.get("name") == "lora":
        qlora = {**setup.finetune, **asdict(QuantConfig()), "name": "qlora"}
        changes.append(("finetune=qlora (the frozen base stored as NF4)", replace(setup, finetune=qlora)))
    if setup.reference_copy:
        changes.append(("task.reference=precomputed (no reference model held)", replace(setup, reference_copy=False)))
    return changes

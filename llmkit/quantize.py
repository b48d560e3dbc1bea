"""Weight-only int8: per-output-channel symmetric int8 weights for the Linear layers of the blocks.

    model = quantize_model(model)                      # block Linears -> Int8Linear (backend: "auto")
    save_quantized(model, tokenizer, "tiny-int8/")     # model.safetensors + config.json + tokenizer
    loaded = load_quantized("tiny-int8/")              # never unpickles: safetensors and JSON only

What is quantized: every nn.Linear inside `model.blocks` (attention projections, dense FFNs) except
MoE routers, whose scores choose experts and are kept in float. Embeddings, norms and the head stay
in float (they are lookups, tiny, or tied to the embedding); `include_head=True` quantizes the head
too (untied heads only). MoE experts are stacked parameters, not Linears, and stay in float.

The stored numbers are one int8 matrix and one float32 scale per output channel: w ~= q * scale,
scale = max|w_row| / 127. Two backends compute with them, chosen at load time, so one file serves both:
  reference  y = (x @ q^T) * scale + b in the input's dtype: exact to the stored numbers, always
             available, slow (the int8 -> float conversion runs every call); the numerical oracle.
  dynamic    torch's dynamic int8 kernel (fbgemm/x86 `quantized::linear_dynamic`) on CPU: activations
             are quantized per call to 7 bits (reduce_range, which keeps AVX2 machines without VNNI
             from saturating), so results differ from the reference by about 1-2% per layer. It is
             deprecated upstream; it is taken only when `torch.ops.quantized` has it, on CPU.
  auto       dynamic where available, else reference (GPUs use reference: torchao's int8 path needs
             torch.compile to beat float, see DESIGN.md section 9).
"""

from __future__ import annotations

import fnmatch
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.model import ModelConfig, Transformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "llmkit-int8-weight-only"
BACKENDS = ("auto", "reference", "dynamic")


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) float -> (out, in) int8 and (out,) float32 scale, symmetric per output channel."""
    scale = weight.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(weight.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dynamic_available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and hasattr(torch.ops.quantized, "linear_dynamic")


class Int8Linear(nn.Module):
    """A Linear whose weight is stored as int8 + per-channel scale (buffers: nothing here trains)."""

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None, backend: str = "reference") -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.size(1), qweight.size(0)
        self.register_buffer("weight", qweight)
        self.register_buffer("weight_scale", scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.backend = "reference"
        self.set_backend(backend)

    @classmethod
    def from_float(cls, linear: nn.Linear, backend: str = "reference") -> Int8Linear:
        q, scale = quantize_weight(linear.weight)
        return cls(q, scale, linear.bias, backend)

    def set_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown int8 backend '{backend}'; choose one of {', '.join(BACKENDS)}")
        usable = dynamic_available(self.weight.device)
        if backend == "dynamic" and not usable:
            raise ValueError("the dynamic int8 backend needs a CPU and torch.ops.quantized.linear_dynamic; use backend=reference")
        self.backend = "dynamic" if backend == "dynamic" or (backend == "auto" and usable) else "reference"
        self._packed = self._pack() if self.backend == "dynamic" else None

    def _pack(self) -> Any:
        """torch's packed int8 weight, built from the stored int8 values and scales (not re-quantized)."""
        zero = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensor creation is deprecated upstream; we feature-detect it
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(self.weight.cpu(), self.weight_scale.double().cpu(), zero, 0)
            return torch.ops.quantized.linear_prepack(qweight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self._packed is not None:
            return torch.ops.quantized.linear_dynamic(x.float(), self._packed, True).to(x.dtype)
        y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


def quantizable(model: Transformer, include_head: bool = False) -> list[str]:
    """Names of the Linear modules quantize_model replaces."""
    names = [
        f"blocks.{name}" for name, module in model.blocks.named_modules()
        if isinstance(module, nn.Linear) and not fnmatch.fnmatch(name, "*router*")
    ]
    if include_head:
        if model.cfg.tie_embeddings:
            raise ValueError("include_head=true needs an untied head: this model's head is the token embedding")
        names.append("head")
    return names


def quantize_model(model: Transformer, backend: str = "auto", include_head: bool = False) -> Transformer:
    """Replace the block Linears (and the head if asked) by Int8Linear, in place; returns the model."""
    for name in quantizable(model, include_head):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, Int8Linear.from_float(getattr(owner, child), backend))
    return model.eval()


def set_backend(model: nn.Module, backend: str) -> None:
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.set_backend(backend)


def int8_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, Int8Linear)]


def save_quantized(model: Transformer, tokenizer: Any, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """model.safetensors (int8 weights, scales, float rest) + config.json + the tokenizer's directory.
    Written into a temporary sibling first and renamed, so a crash never leaves a directory that
    looks complete; an existing directory is not overwritten."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose another out= (nothing was overwritten)")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=False)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if v is not None}
    tensors = _untie(tensors, model)
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
    config = {
        "format": FORMAT, "model_config": model.cfg.to_dict(), "int8_modules": int8_names(model), **(extra or {}),
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        (tmp / TOKENIZER_DIR).mkdir()
        tokenizer.save(tmp / TOKENIZER_DIR)
    tmp.rename(out_dir)
    return out_dir


def _untie(tensors: dict[str, Tensor], model: Transformer) -> dict[str, Tensor]:
    """safetensors refuses tensors that share memory: a tied head is saved once, as the embedding."""
    if model.cfg.tie_embeddings:
        tensors.pop("head.weight", None)
    return tensors


def is_quantized_dir(path: str | Path) -> bool:
    config = Path(path) / CONFIG_FILE
    return config.is_file() and json.loads(config.read_text()).get("format") == FORMAT


def load_quantized(path: str | Path, backend: str = "auto", device: str | torch.device = "cpu") -> tuple[Transformer, Any, dict]:
    """(model, tokenizer or None, config dict) from a directory written by save_quantized."""
    from safetensors.torch import load_file

    from llmkit.text.tokenizer import load_tokenizer

    path = Path(path)
    if not is_quantized_dir(path):
        raise ValueError(f"{path} is not an int8 directory written by `llmkit quantize` (no {CONFIG_FILE} with format {FORMAT})")
    config = json.loads((path / CONFIG_FILE).read_text())
    model = Transformer(ModelConfig.from_dict(config["model_config"]))
    for name in config["int8_modules"]:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = getattr(owner, child)
        placeholder = torch.zeros(linear.out_features, linear.in_features, dtype=torch.int8)
        bias = None if linear.bias is None else linear.bias
        setattr(owner, child, Int8Linear(placeholder, torch.ones(linear.out_features), bias, "reference"))
    state = load_file(str(path / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - ({"head.weight"} if model.cfg.tie_embeddings else set()))
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE} does not match its config: missing {missing}, unexpected {sorted(unexpected)}")
    model.to(device).eval()
    set_backend(model, backend)  # packs the dynamic weights now that the int8 values are loaded
    tokenizer_dir = path / TOKENIZER_DIR
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else None
    return model, tokenizer, config

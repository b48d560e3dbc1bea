"""QLoRA (Dettmers et al. 2023): LoRA adapters in full precision over a frozen base stored quantized.

    names = apply_qlora(model, LoraConfig(r=8), QuantConfig(quant_type="nf4", block_size=64, double_quant=True))
    ...train: only the adapters require grad; every block Linear is held as 4-bit codes + scales...
    dequantize_model(model); merge_lora(model)      # inference: adapters merged into the DEQUANTIZED base

Why our own NF4 in plain torch rather than torchao's NF4Tensor or bitsandbytes: the format is a 16-entry
code book, a blockwise absmax and (double quantization) 8-bit scales: about 60 lines of torch that run on
any device, with no extra dependency and no version pin against torch 2.13. torchao's NF4Tensor is a tensor
subclass that state-dict, FSDP, deepcopy and torch.compile each treat specially (and its dequantization is
the same gather and multiply in torch), and bitsandbytes is a native library whose CPU kernels vary by
build (peft + bitsandbytes 4-bit ran here, 1.5x slower per step than this: scripts/bench_finetune.py). What
a run needs from them is the memory layout, which this file has:

- The weight is flattened row-major and cut into blocks of `block_size` (64: 4 bits + 8 bits / 64 per
  weight). Each block is divided by its absmax and every value takes the nearest of the 16 NF4 levels
  (quantiles of N(0, 1), as bitsandbytes lists them); two 4-bit codes per byte. int8 instead takes
  round(127 x), symmetric.
- Double quantization: the fp32 absmax scales are cut into groups of 256 and stored as uint8 on an affine
  grid over each group's [min, max] (two fp32 per group). bitsandbytes subtracts the global mean first and
  uses a signed 8-bit grid; the per-group affine grid has the same 8 bits and needs no global reduction,
  so the codes are the same on every machine (the checkpoint's fingerprint below relies on it). The
  weights are coded against the *stored* scales, so the round trip error stays within half a code gap
  times the stored scale (tests/adapters/test_qlora.py checks this bound).
- Forward dequantizes one Linear at a time into the compute dtype (the autocast dtype, else the input's)
  and drops it; a custom autograd function dequantizes again in backward instead of keeping the weight
  alive for it, so a training step never holds more than one layer's full-precision weight.
- The quantized tensors are non-persistent buffers: checkpoints never hold them (the base is recomputed
  from the checkpoint `init_from` names, deterministically, and checked against a fingerprint saved with
  the adapters: `quant_fingerprint`).
- `weight` on a quantized Linear is a read-only property giving the dequantized weight in the original
  dtype, so code that reads shapes or the weight (PEFT export, the MoE router) keeps working. Merging
  first turns every quantized Linear back into a plain one holding its dequantized weight
  (`dequantize_model`): the merged model is the dequantized base plus scale * B @ A, which is the function
  the adapters were trained with.
- Not parameters, but still weights: `model.num_params()` adds each quantized Linear's out x in
  (`quantized_params`), so flops_per_token, the logged MFU and the run summary count the whole model.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.adapters.lora import LoraConfig, LoraLinear, apply_lora
from llmkit.model.moe import SoftmaxRouter
from llmkit.registry import Registry

SCALE_GROUP = 256  # scales per double-quantization group (bitsandbytes' and torchao's choice)
# NF4 levels: bitsandbytes' get_4bit_type("nf4") (create_normal_map(offset=0.9677083, use_extra_value=True))
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
QUANT_FORMATS: Registry[Any] = Registry("quantization format")


@dataclass
class QuantConfig:
    quant_type: str = "nf4"  # nf4 | int8 (QUANT_FORMATS)
    block_size: int = 64  # weights per absmax scale
    double_quant: bool = True  # the scales themselves as uint8 (0.125 bit per weight instead of 0.5 at 64)
    quantize: list[str] = field(default_factory=lambda: ["blocks.*"])  # which frozen Linears are stored quantized

    def __post_init__(self) -> None:
        QUANT_FORMATS.get(self.quant_type)  # an unknown name fails listing nf4, int8
        if self.block_size < 2 or self.block_size % 2:
            raise ValueError(f"qlora block_size must be an even number >= 2 (two 4-bit codes per byte), got {self.block_size}")
        self.quantize = list(self.quantize)


def qlora_configs(options: dict[str, Any]) -> tuple[LoraConfig, QuantConfig]:
    """finetune=qlora's options (conf/finetune/qlora.yaml, without `name`) split into LoRA's and the base's."""
    quant_keys = {f.name for f in fields(QuantConfig)}
    lora = {k: (list(v) if k == "targets" else v) for k, v in options.items() if k not in quant_keys}
    return LoraConfig(**lora), QuantConfig(**{k: v for k, v in options.items() if k in quant_keys})


# ---- formats: values in [-1, 1] (a weight over its block's absmax) <-> codes ------------------------
@QUANT_FORMATS.register("nf4")
class NF4:
    bits = 4

    @staticmethod
    def encode(x: Tensor) -> Tensor:
        """(n, block) values -> (n, block / 2) uint8, two nearest-level codes per byte (high nibble first)."""
        levels = torch.tensor(NF4_LEVELS, dtype=x.dtype, device=x.device)
        codes = torch.bucketize(x, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)  # nearest level's index
        return codes[:, 0::2] << 4 | codes[:, 1::2]

    @staticmethod
    def decode(codes: Tensor) -> Tensor:
        """(n, block / 2) uint8 -> (n, block) fp32 levels."""
        levels = torch.tensor(NF4_LEVELS, device=codes.device)
        pairs = torch.stack((levels.repeat_interleave(16), levels.repeat(16)), dim=1)  # (256, 2): byte -> its two levels
        return F.embedding(codes.long(), pairs).flatten(1)  # (n, block / 2, 2) -> (n, block): one gather per byte


@QUANT_FORMATS.register("int8")
class Int8:
    bits = 8

    @staticmethod
    def encode(x: Tensor) -> Tensor:
        return torch.round(x * 127).clamp_(-127, 127).to(torch.int8)

    @staticmethod
    def decode(codes: Tensor) -> Tensor:
        return codes.float() / 127


# ---- one weight -------------------------------------------------------------------------------------
def quantize_weight(w: Tensor, cfg: QuantConfig) -> dict[str, Tensor]:
    """The tensors that hold w: codes, and the scales (fp32, or uint8 + per-group lo/step)."""
    blocks = _blocks(w.detach().float(), cfg.block_size)  # (n, block)
    absmax = blocks.abs().amax(dim=1)  # (n,)
    out: dict[str, Tensor] = {}
    if cfg.double_quant:
        out.update(_quantize_scales(absmax))
        scales = _dequantize_scales(out, absmax.numel())
    else:
        out["q_scales"] = scales = absmax
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero block codes zeros
    out["q_codes"] = QUANT_FORMATS.get(cfg.quant_type).encode(blocks / divisor[:, None])
    return out


def dequantize_weight(q: dict[str, Tensor], cfg: QuantConfig, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """The weight the codes stand for, computed in fp32 and returned in dtype, (out, in)."""
    codes = q["q_codes"]
    n = codes.size(0)
    scales = _dequantize_scales(q, n) if cfg.double_quant else q["q_scales"]
    values = QUANT_FORMATS.get(cfg.quant_type).decode(codes).mul_(scales[:, None])  # (n, block)
    return values.flatten()[: shape[0] * shape[1]].view(shape).to(dtype)


def quantized_nbytes(numel: int, cfg: QuantConfig) -> int:
    """Bytes that quantize_weight stores for a weight of numel elements (for estimates: llmkit plan)."""
    blocks = -(-numel // cfg.block_size)
    codes = blocks * cfg.block_size * QUANT_FORMATS.get(cfg.quant_type).bits // 8
    groups = -(-blocks // SCALE_GROUP)
    return codes + (groups * (SCALE_GROUP + 8) if cfg.double_quant else 4 * blocks)  # uint8 + lo, step | fp32


def _blocks(w: Tensor, block_size: int) -> Tensor:
    flat = w.flatten()
    pad = -flat.numel() % block_size  # the last block is padded with zeros (sliced off on dequantization)
    return F.pad(flat, (0, pad)).view(-1, block_size)  # (n, block)


def _quantize_scales(absmax: Tensor) -> dict[str, Tensor]:
    groups = _blocks(absmax, SCALE_GROUP)  # (m, 256); padding zeros only widen the last group's range
    lo, hi = groups.amin(dim=1), groups.amax(dim=1)
    step = (hi - lo) / 255
    step = torch.where(step > 0, step, torch.ones_like(step))  # a constant group: every code 0, the scale lo
    codes = torch.round((groups - lo[:, None]) / step[:, None]).clamp_(0, 255).to(torch.uint8)
    return {"q_scales": codes.flatten(), "q_scale_lo": lo, "q_scale_step": step}


def _dequantize_scales(q: dict[str, Tensor], n: int) -> Tensor:
    codes = q["q_scales"].view(-1, SCALE_GROUP).float()  # (m, 256)
    return (q["q_scale_lo"][:, None] + codes * q["q_scale_step"][:, None]).flatten()[:n]


# ---- layers -----------------------------------------------------------------------------------------
class _Quantized:
    """Storage shared by QuantLinear and QLoraLinear: the weight as non-persistent buffers."""

    quant_config: QuantConfig
    quant_dtype: torch.dtype
    bias: Tensor | None
    in_features: int
    out_features: int

    def _store(self, cfg: QuantConfig) -> None:
        module: Any = self
        w = module._parameters.pop("weight")  # the full-precision weight is dropped here
        module.quant_config, module.quant_dtype = cfg, w.dtype
        for name, t in quantize_weight(w, cfg).items():
            module.register_buffer(name, t, persistent=False)  # recomputed from the base, never saved

    def quantized_tensors(self) -> dict[str, Tensor]:
        return {name: t for name, t in self._buffers.items() if name.startswith("q_")}  # type: ignore[attr-defined]

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        return dequantize_weight(self.quantized_tensors(), self.quant_config, (self.out_features, self.in_features), dtype)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (a fresh tensor: writing into it changes nothing)."""
        return self.dequantized(self.quant_dtype)

    def quantized_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.quantized_tensors().values())

    def quantized_params(self) -> int:
        """The weights the codes stand for: buffers, not parameters, but each one a multiply-add per token
        (Transformer.num_params counts them, so flops_per_token and MFU do)."""
        return self.out_features * self.in_features

    def _base_forward(self, x: Tensor) -> Tensor:
        return _QuantLinearFn.apply(x.to(_compute_dtype(x)), self)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else x's. Meta tensors (llmkit plan traces a step
    on them) have no autocast state to ask."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if kind != "meta" and torch.is_autocast_enabled(kind) else x.dtype


class _QuantLinearFn(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward (nothing but x's shape is kept)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: _Quantized) -> Tensor:
        ctx.layer = layer
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return F.linear(x, layer.dequantized(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad @ ctx.layer.dequantized(grad.dtype), None  # (..., out) @ (out, in) -> (..., in); W is frozen


class QuantLinear(_Quantized, nn.Linear):
    """A frozen nn.Linear stored quantized. Never constructed: `quantize_linears` re-classes in place."""

    def forward(self, x: Tensor) -> Tensor:
        return self._base_forward(x)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self.quant_config.quant_type}/{self.quant_config.block_size}"


class QLoraLinear(_Quantized, LoraLinear):
    """A LoraLinear whose frozen weight is stored quantized; the adapters stay in full precision."""

    def forward(self, x: Tensor) -> Tensor:
        y = self._base_forward(x)  # equals F.linear(x, dequantized W) bit for bit: B == 0 at init
        if not self.lora_enabled:
            return y
        # not lora.add_lora's in-place addmm_: llmkit plan traces this forward, and its live-tensor count of
        # the in-place form came out 0.1 GB over the measured peak of a QLoRA SFT run (tests/test_plan.py)
        h = F.dropout(x, self.lora_config.dropout, self.training) if self.lora_config.dropout else x
        return y + self.lora_config.scale * F.linear(F.linear(h, self.lora_A), self.lora_B)  # (..., r) -> (..., out)

    def delta_weight(self) -> Tensor:
        return (self.lora_config.scale * (self.lora_B.float() @ self.lora_A.float())).to(self.quant_dtype)


# ---- applying ---------------------------------------------------------------------------------------
def apply_qlora(model: nn.Module, lora: LoraConfig, quant: QuantConfig) -> list[str]:
    """LoRA on lora.targets (everything else frozen), then every frozen Linear matched by quant.quantize
    stored quantized. Returns the adapted module names."""
    names = apply_lora(model, lora)
    quantize_linears(model, quant)
    return names


def quantize_linears(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Store every Linear that a cfg.quantize pattern matches quantized (a LoraLinear becomes a
    QLoraLinear). A pattern matching no Linear is an error; the MoE router's projection (read as a raw
    fp32 weight) and a weight shared with another module (a tied head) are left in full precision."""
    modules = dict(model.named_modules())
    shared = _shared_weights(model)
    names = []
    for pattern in cfg.quantize:
        hits = [n for n, m in modules.items() if n and fnmatchcase(n, pattern) and isinstance(m, nn.Linear)]
        if not hits:
            raise ValueError(f"qlora quantize pattern '{pattern}' matches no Linear module (try blocks.*)")
        names += [n for n in hits if n not in names]
    done = []
    for name in names:
        module = modules[name]
        parent = modules[name.rpartition(".")[0]]
        if isinstance(module, _Quantized) or isinstance(parent, SoftmaxRouter) or id(module.weight) in shared:
            continue
        target = QLoraLinear if isinstance(module, LoraLinear) else QuantLinear
        module.__class__ = target
        module._store(cfg)
        done.append(name)
    return done


def _shared_weights(model: nn.Module) -> set[int]:
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    return {key for key, count in owners.items() if count > 1}


def quantized_layers(model: nn.Module) -> list[tuple[str, _Quantized]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _Quantized)]


def quant_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex digits) of every quantized tensor, in module order: the exact base the adapters see."""
    digest = hashlib.sha256()
    for name, m in quantized_layers(model):
        digest.update(name.encode())
        for key, t in sorted(m.quantized_tensors().items()):
            digest.update(key.encode())
            digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def quant_record(quant: QuantConfig, model: nn.Module) -> dict[str, Any]:
    """What an adapter checkpoint records so that loading rebuilds this very base."""
    return {"config": asdict(quant), "fingerprint": quant_fingerprint(model)}


def check_fingerprint(model: nn.Module, record: dict[str, Any], base: str) -> None:
    found = quant_fingerprint(model)
    if record.get("fingerprint") not in (None, found):
        raise ValueError(f"the base {base} quantizes to {found}, but these adapters were trained on the quantized base "
                         f"{record['fingerprint']}: the base checkpoint changed since; load the adapters onto the base "
                         "they were trained on")


@torch.no_grad()
def dequantize_model(model: nn.Module) -> None:
    """Every quantized Linear back to a full-precision one holding its dequantized weight (QLoraLinear ->
    LoraLinear, QuantLinear -> nn.Linear): then merge_lora merges into the dequantized base."""
    for _, m in quantized_layers(model):
        weight = nn.Parameter(m.dequantized(m.quant_dtype), requires_grad=False)
        for name in list(m.quantized_tensors()):
            del m._buffers[name]  # type: ignore[attr-defined]
        del m.quant_config, m.quant_dtype  # type: ignore[attr-defined]
        m.__class__ = LoraLinear if isinstance(m, LoraLinear) else nn.Linear
        m.weight = weight  # type: ignore[attr-defined]


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (quantized codes and scales included), shared ones once."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())

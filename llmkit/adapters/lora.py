"""LoRA (Hu et al. 2021), applied from outside the model, as FSDP and activation checkpointing are.

    names = apply_lora(model, LoraConfig(r=8, alpha=16, targets=["blocks.*.attention.*"]))
    ...train: only the adapters require grad...
    with lora_disabled(model): ref_logits = model(idx)    # the frozen base (DPO's reference model)
    merge_lora(model); ...; unmerge_lora(model)

Design:
- Each targeted `nn.Linear` has its class swapped in place to `LoraLinear`, a subclass of nn.Linear that
  adds `lora_A` (r, in) and `lora_B` (out, r). The module keeps its name and its `weight`/`bias`, so the
  base state-dict names do not change (`blocks.0.attention.wqkv.weight` stays that) and llmkit/hf.py
  exports the base as before; the adapters add `...wqkv.lora_A` and `...wqkv.lora_B`. No file in
  llmkit/model knows about LoRA, and the swap keeps every reference to the module (the transformer's
  provider lists, a wrapper applied later) pointing at the same object.
- forward = base(x) + scale * dropout(x) A^T B^T with scale = alpha / r (or alpha / sqrt(r), rsLoRA,
  Kalajdzievski 2023). B starts at zero, so at init the adapted model computes the base's logits bit
  for bit; A is kaiming-uniform, as in PEFT.
- Targets are fnmatch patterns over `model.named_modules()` names (`*` also crosses dots). A pattern
  must match at least one Linear (a typo fails instead of training nothing), and a matched module
  that holds weights LoRA cannot adapt (stacked MoE experts, a router read as a raw weight) fails
  by name. Apply LoRA before torch.compile / FSDP wrap the model: their wrappers rename modules.
- Fused projections (llmkit's `wqkv`) get one adapter over the fused output, i.e. the q, k and v
  adapters share A. The PEFT export (peft_format.py) splits B by rows and repeats A, which is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.model.moe import SoftmaxRouter

ADAPTER_PARAMS = ("lora_A", "lora_B")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input only, as in PEFT
    targets: list[str] = field(default_factory=lambda: ["blocks.*.attention.wqkv", "blocks.*.attention.wo"])
    rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r: the update's size stops shrinking with r

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("lora targets is empty: give module-name patterns such as blocks.*.attention.wqkv")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoraLinear(nn.Linear):
    """An nn.Linear plus a low-rank update. Never constructed: `apply_lora` re-classes a Linear in place."""

    lora_A: nn.Parameter  # (r, in)
    lora_B: nn.Parameter  # (out, r)
    lora_config: LoraConfig
    lora_merged: bool
    lora_enabled: bool
    _lora_w0: Tensor | None  # the weight before merge_lora(keep_original=True)

    @classmethod
    def adapt(cls, linear: nn.Linear, cfg: LoraConfig) -> LoraLinear:
        linear.__class__ = cls
        lora = linear  # now a LoraLinear; the same object, so parents and state-dict names are untouched
        w = lora.weight
        lora.lora_A = nn.Parameter(torch.empty(cfg.r, lora.in_features, device=w.device, dtype=w.dtype))
        lora.lora_B = nn.Parameter(torch.zeros(lora.out_features, cfg.r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(lora.lora_A, a=math.sqrt(5))  # PEFT's init (that of nn.Linear's weight)
        lora.lora_config, lora.lora_merged, lora.lora_enabled, lora._lora_w0 = cfg, False, True, None
        return lora

    def forward(self, x: Tensor) -> Tensor:
        if self.lora_merged or not self.lora_enabled:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)  # (N, out): nn.Linear's forward
        return add_lora(y, x, self).view(*x.shape[:-1], self.out_features)

    def delta_weight(self) -> Tensor:
        """scale * B @ A (out, in), summed in fp32 and returned in the weight's dtype."""
        return (self.lora_config.scale * (self.lora_B.float() @ self.lora_A.float())).to(self.weight.dtype)

    def extra_repr(self) -> str:
        cfg = self.lora_config
        return f"{super().extra_repr()}, lora_r={cfg.r}, lora_scale={cfg.scale:g}, merged={self.lora_merged}"


def add_lora(y: Tensor, x: Tensor, lora: LoraLinear) -> Tensor:
    """y (N, out), the base's output for x (..., in), plus scale * dropout(x) A^T B^T, written into y.

    One addmm_ adds the update in the pass that computes it: no (N, out) temporaries for the product, its
    scaling and the sum (two of them also in backward). B enters transposed and contiguous, (r, out) row
    major (a copy of r x out numbers): autograd then forms B's gradient as z^T @ dy, (r, N) @ (N, out),
    and z's as dy @ B, where a column-major operand makes it return (dy^T @ z)^T, a skinny GEMM that ran
    14x slower on one CPU core here (2048 tokens, out 1536, r 8; scripts/bench_finetune.py shows the step).
    In place is safe: the base's matmul keeps its inputs for backward, not its output. At init (B == 0)
    y + scale * 0 is y bit for bit."""
    cfg = lora.lora_config
    h = F.dropout(x, cfg.dropout, lora.training) if cfg.dropout else x  # no dropout op at all when 0
    z = F.linear(h.reshape(-1, lora.in_features), lora.lora_A)  # (N, r); autocast casts A as it casts W
    b_t = lora.lora_B.t().to(y.dtype).contiguous()  # (r, out), row major
    return y.addmm_(z.to(y.dtype), b_t, alpha=cfg.scale)  # (N, r) @ (r, out)


# ---- applying -----------------------------------------------------------------------------------------
def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Adapt every Linear whose name matches one of cfg.targets; freeze everything else. Returns the
    adapted module names. Raises ValueError naming the problem if a pattern matches no Linear or
    matches a module whose weights LoRA cannot adapt."""
    modules = dict(model.named_modules())
    names = _matched_linears(modules, cfg.targets)  # fails before anything changes
    adapters = {id(getattr(m, p)) for _, m in lora_layers(model) for p in ADAPTER_PARAMS}  # from an earlier call
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)
    for name in names:
        LoraLinear.adapt(modules[name], cfg)  # new parameters require grad
    return names


def _matched_linears(modules: dict[str, nn.Module], patterns: list[str]) -> list[str]:
    problems: list[str] = []
    matched: set[str] = set()
    for pattern in patterns:
        hits = [name for name in modules if name and fnmatchcase(name, pattern)]
        linears = [name for name in hits if isinstance(modules[name], nn.Linear)]
        problems += [why for why in (_why_not(name, modules, pattern) for name in hits) if why]
        if not linears:
            problems.append(f"'{pattern}' matches no Linear module")
        matched.update(linears)
    if problems:
        raise ValueError("cannot apply LoRA: " + "; ".join(problems) + f". Linear modules here: {_linear_names(modules)}")
    return [name for name in modules if name in matched]  # model order


def _why_not(name: str, modules: dict[str, nn.Module], pattern: str) -> str | None:
    """Why the module `pattern` matched cannot be adapted, or None if it can (or holds no weights:
    a container such as `blocks.0.ffn`, whose Linear children the pattern may match too)."""
    module = modules[name]
    if isinstance(module, LoraLinear):
        return f"{name} already has a LoRA adapter"
    parent = modules[name.rpartition(".")[0]]
    if isinstance(module, nn.Linear) and isinstance(parent, SoftmaxRouter):
        # the router reads proj.weight in fp32 instead of calling proj: an adapter would never run
        return f"{name} (matched by '{pattern}') is the MoE router's projection, which the router uses as a raw weight"
    own = [n for n, _ in module.named_parameters(recurse=False)]
    if own and not isinstance(module, nn.Linear):
        return (f"{name} (matched by '{pattern}') is a {type(module).__name__}, not an nn.Linear: its weights "
                f"{', '.join(own)} (stacked MoE expert weights, an embedding, a norm) cannot take a LoRA adapter")
    return None


def _linear_names(modules: dict[str, nn.Module]) -> str:
    """Linear module names with layer indices folded to '*' (usable as patterns as they stand)."""
    folded = {".".join("*" if part.isdigit() else part for part in name.split("."))
              for name, m in modules.items() if isinstance(m, nn.Linear)}
    return ", ".join(sorted(folded))


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]


def _require_lora(model: nn.Module, merged: bool | None = None) -> list[tuple[str, LoraLinear]]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters (call apply_lora first)")
    if merged is not None and any(m.lora_merged != merged for _, m in layers):
        raise RuntimeError("the LoRA adapters are " + ("not merged" if merged else "merged: call unmerge_lora first"))
    return layers


# ---- merging ------------------------------------------------------------------------------------------
@torch.no_grad()
def merge_lora(model: nn.Module, keep_original: bool = True) -> None:
    """W <- W + scale * B @ A in every adapted Linear; forward then skips the adapter (same function,
    one matmul). keep_original=True keeps a copy of each W so that unmerge_lora restores it exactly
    (memory: one more copy of the adapted weights until unmerge); False subtracts the delta again
    on unmerge, as PEFT does: W0 back to within one rounding per element, and wrong if the adapters
    changed in between."""
    layers = _require_lora(model, merged=False)
    quantized = [name for name, m in layers if "weight" not in m._parameters]
    if quantized:  # a QLoRA base has codes and scales, no weight to add the delta to
        raise RuntimeError(f"{quantized[0]} has a quantized base (finetune=qlora): dequantize it first "
                           "(llmkit.adapters.qlora.dequantize_model), then merge")
    _refuse_shared_weights(model, layers)
    for _, m in layers:
        m._lora_w0 = m.weight.detach().clone() if keep_original else None
        m.weight.add_(m.delta_weight())
        m.lora_merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: W back to its value before the merge."""
    for _, m in _require_lora(model, merged=True):
        if m._lora_w0 is not None:
            m.weight.copy_(m._lora_w0)
        else:
            m.weight.sub_(m.delta_weight())
        m._lora_w0, m.lora_merged = None, False


def _refuse_shared_weights(model: nn.Module, layers: list[tuple[str, LoraLinear]]) -> None:
    """A tied head's weight is also the token embedding: merging into it would change the embedding too."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, m in layers:
        if len(owners[id(m.weight)]) > 1:
            raise ValueError(f"cannot merge LoRA into {name}: its weight is shared ({', '.join(owners[id(m.weight)])}; "
                             "tied embeddings), and merging would change every module that uses it")


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the model computes the base alone (the adapters are skipped, nothing is copied): DPO's
    reference model. The adapters must not be merged."""
    layers = _require_lora(model, merged=False)
    before = [m.lora_enabled for _, m in layers]  # restored as found: nesting works
    for _, m in layers:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for (_, m), enabled in zip(layers, before, strict=True):
            m.lora_enabled = enabled


# ---- adapter state ------------------------------------------------------------------------------------
def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors alone ({module}.lora_A / .lora_B), detached: a checkpoint of the fine-tune."""
    return {f"{name}.{p}": getattr(m, p).detach() for name, m in lora_layers(model) for p in ADAPTER_PARAMS}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy adapter tensors (as lora_state_dict returns them) into a model with the same adapters."""
    _require_lora(model, merged=False)  # a merged weight would keep the old adapter's delta
    own = lora_state_dict(model)
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"LoRA state does not fit the model: missing {missing}, unexpected {unexpected}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"LoRA state {key}: shape {tuple(value.shape)}, the model has {tuple(own[key].shape)}")
        own[key].copy_(value)  # detached views of the parameters: writes into them


def strip_merged(model: nn.Module) -> None:
    """Merged adapters back to plain nn.Linear (the adapter tensors dropped): the state dict is then
    exactly a base model's, for the exporter, quantization and the server."""
    for _, m in _require_lora(model, merged=True):
        for name in ADAPTER_PARAMS:
            del m._parameters[name]
        for name in ("lora_config", "lora_merged", "lora_enabled", "_lora_w0"):
            delattr(m, name)
        m.__class__ = nn.Linear

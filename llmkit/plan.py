"""Plan a run before it starts: parameters, FLOPs, memory per rank, time and Chinchilla sizing.

Everything comes from the composed config, touching no data. The model is built on the meta device
(no memory), so parameter counts are exact for every registry combination, and the activations a
training step keeps for backward are found by running that step on meta tensors and adding up what
autograd saves (`saved_tensors_hooks`), with activation checkpointing applied as the run applies it.
Only the attention kernel is modelled rather than traced: a fused kernel (sdpa's flash or
memory-efficient paths, flex, xformers) keeps q, k, v, the output and a log-sum-exp per row; the
eager kernel, and sdpa's math fallback on the CPU with dropout, keep the (B, H, T, S) scores.

The pre-flight compares the process's peak, not those kept bytes: a step runs again on meta tensors
under a dispatch mode that follows every storage from the op that makes it to its last reference
(traced_peak), which gives the highest point of weights, optimizer states, gradients, the forward's
tensors and the backward's working set; with_runtime adds the process itself (measured once per machine
kind), the loader and the allocator's slack (CPU_HEAP_SLACK, GPU_ALLOCATOR_SLACK).

Post-training (llmkit/plan_adapters.py): the planned model carries the run's LoRA / QLoRA adapters, so
gradients and optimizer states are the adapters' and a QLoRA base is its codes and scales, with the weight
each matmul dequantizes traced; a run with init_from may peak while loading its base instead, and DPO's
reference copy is held beside the policy.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from llmkit.model import ModelConfig, Transformer
from llmkit.plan_adapters import (
    apply_finetune,
    base_file_bytes,
    describe_finetune,
    finetune_options,
    lighter_runs,
    load_peak,
    quantized_bytes,
    quantized_tensors,
    reference_copy_bytes,
)

# Chinchilla Approach 3 (Hoffmann et al. 2022, eq. 10): L(N, D) = E + A / N^alpha + B / D^beta
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
GIB = 2**30


@dataclass
class Setup:
    """What a plan needs from a composed training config."""

    model: ModelConfig
    batch_size: int  # micro-batch per rank
    seq_len: int
    precision: str = "32"
    checkpointing: str = "none"  # none | selective | full
    ranks: int = 1  # devices x nodes
    sharded: bool = False  # FSDP: weights, gradients and optimizer states divided by the ranks
    accelerator: str = "cpu"
    peak_flops: float | None = None  # per device
    accumulate: int = 1
    optimizer: str = "fused"  # AdamW's implementation: fused | foreach | single (torch's for-loop)
    clip_grad: bool = False  # gradient clipping by the global norm before the step
    finetune: dict[str, Any] = field(default_factory=lambda: {"name": "full"})  # full | lora | qlora and options
    base_bytes: int = 0  # what loading init_from reads into memory (0: no base to load; plan_adapters.load_peak)
    reference_copy: bool = False  # DPO's task.reference=copy: a frozen copy of the base beside the policy


@dataclass
class Plan:
    params: dict[str, int]  # per component; tied weights once
    total_params: int
    active_params: int  # MoE: shared + top_k experts
    flops_per_token: int  # 6 x active matmul weights + attention (window-aware): what MFU counts
    executed_flops_per_token: int  # what the kernels run: a masked window still computes every score
    memory: dict[str, int]  # bytes per rank
    scores_bytes: int  # the (B, H, T, S) part of the activations (0 for fused kernels)
    kernel_keeps_scores: bool
    tokens_per_step: int
    setup: dict[str, Any] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)  # the process's highest point per rank, by part
    peak_phase: str = ""  # where in the step it happens: forward | backward | optimizer (| load: the base's)
    trainable_params: int = 0  # what gradients and AdamW states exist for (the adapters under lora / qlora)
    quantized_bytes: int = 0  # qlora: the frozen base's codes and scales (in memory["weights"])

    @property
    def total_memory(self) -> int:
        """The tensors a step holds (states and saved activations), without the transients or the process."""
        return sum(self.memory.values())

    @property
    def peak_memory(self) -> int:
        """What the pre-flight compares with the device: the process's peak (with_runtime adds the
        runtime and the allocator's slack to the traced tensors)."""
        return sum(self.peak.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_memory": self.total_memory, "peak_memory": self.peak_memory}


# ---- parameters and FLOPs ---------------------------------------------------------------------------


def meta_model(cfg: ModelConfig) -> Transformer:
    """The model with meta tensors: shapes without memory, built by the same registries as a run."""
    with torch.device("meta"):
        return Transformer(cfg)


def run_model(setup: Setup) -> Transformer:
    """The meta model as the run trains it: with its finetune's adapters and quantized base (plan_adapters)."""
    model = meta_model(setup.model)
    apply_finetune(model, setup.finetune)
    return model


def component_params(model: Transformer) -> dict[str, int]:
    """Parameters per component in model order, each tensor once (a tied head is the embedding); a
    quantized Linear's weights (buffers: `quantized_params`) count in its component, LoRA's adapters apart."""
    seen: set[int] = set()
    counts = []
    for prefix, module in model.named_modules():
        for name, p in module.named_parameters(prefix=prefix, recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                counts.append((name, p.numel()))
        if hasattr(module, "quantized_params"):
            counts.append((f"{prefix}.weight", module.quantized_params()))
    groups: dict[str, int] = {}
    for name, count in counts:
        groups[_component(name)] = groups.get(_component(name), 0) + count
    return groups


def _component(name: str) -> str:
    parts = name.split(".")
    if parts[-1] in ("lora_A", "lora_B"):
        return "lora adapters"
    if parts[0] == "blocks":
        part = parts[2]
        if part == "ffn" and "experts" in parts:
            return "ffn.experts"
        if part == "ffn" and "router" in parts:
            return "ffn.router"
        return "norm" if part.startswith("norm") else part
    return {"tok_emb": "embedding", "head": "head"}.get(parts[0], parts[0])


def active_params(model: Transformer) -> int:
    return model.num_params() - sum(m.inactive_params() for m in model.modules() if hasattr(m, "inactive_params"))


def masked_keys(cfg: ModelConfig, seq_len: int) -> int:
    """Keys per query outside the window that the kernel still scores: a mask (sdpa, eager) computes
    every one, flex and xformers skip them."""
    window = cfg.attention.get("window")
    if not window or cfg.attention.get("kernel", "sdpa") in ("flex", "xformers"):
        return 0
    return max(0, seq_len - window)


# ---- memory -----------------------------------------------------------------------------------------


def param_bytes(precision: str) -> int:
    """Bytes per parameter (and gradient): float32 masters under mixed precision, 2 under *-true 16-bit."""
    return 2 if precision in ("bf16-true", "16-true", "bf16", "16") else 4


def state_bytes(model: Transformer, setup: Setup) -> dict[str, int]:
    """Weights, gradients and AdamW states per rank. AdamW keeps exp_avg and exp_avg_sq in the
    parameter's dtype and a float32 step count per tensor (fused or not); FSDP2 shards each tensor
    along dim 0, padded to a multiple of the ranks."""
    size = param_bytes(setup.precision)
    ranks = setup.ranks if setup.sharded else 1
    elements = sum(_shard_numel(p, ranks) for p in model.parameters())
    trainable = sum(_shard_numel(p, ranks) for p in model.parameters() if p.requires_grad)
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    states = {"weights": elements * size + quantized_bytes(model),  # qlora: the base's codes and scales beside
              "gradients": trainable * size, "optimizer": 2 * trainable * size + 4 * tensors}
    if setup.sharded and ranks > 1:  # a block's full parameters while it computes, and the next one's prefetched
        largest = max((sum(p.numel() for p in block.parameters()) for block in model.blocks), default=0)
        states["fsdp_gathered"] = 2 * largest * size
    return states


def _shard_numel(p: Tensor, ranks: int) -> int:
    if ranks == 1 or p.dim() == 0:
        return p.numel()
    return math.ceil(p.shape[0] / ranks) * (p.numel() // p.shape[0])


def kernel_keeps_scores(model: Transformer, accelerator: str) -> bool:
    """Whether the attention kernel keeps the (B, H, T, S) probabilities for backward. sdpa on the
    CPU takes its flash kernel for causal attention and boolean masks, and its math kernel for a
    float bias (ALiBi, T5) or dropout (DESIGN.md, section 5); on a GPU the memory-efficient kernel
    takes a bias too."""
    kernel = model.cfg.attention.get("kernel", "sdpa")
    if kernel == "eager":
        return True
    return kernel == "sdpa" and accelerator == "cpu" and (model.cfg.dropout > 0 or _has_bias(model))


def _has_bias(model: Transformer) -> bool:
    pos = torch.arange(2, device=model.tok_emb.weight.device)
    return model.position.context(pos, pos).bias is not None


class _FusedAttention(torch.autograd.Function):
    """What a fused kernel keeps for backward: q, k, v, the output, a float32 log-sum-exp per row
    (and the mask or bias it was given). Used only while tracing on meta tensors."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:  # type: ignore[override]
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


@contextlib.contextmanager
def _fused_sdpa():
    real = F.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _FusedAttention.apply(q, k, v, attn_mask if isinstance(attn_mask, Tensor) else None)

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def step_model(setup: Setup) -> Transformer:
    """The run's model on the meta device (adapters applied as the run applies them), in the dtype its
    activations take (under mixed precision autocast keeps matmul activations in 16 bits; a quantized base
    dequantizes into it), with the run's activation checkpointing."""
    from llmkit.recompute import apply_activation_checkpointing

    model = run_model(setup).train()
    if setup.precision in ("bf16-true", "bf16", "bf16-mixed"):
        model = model.to(torch.bfloat16)
    elif setup.precision in ("16-true", "16", "16-mixed"):
        model = model.to(torch.float16)
    apply_activation_checkpointing(model, setup.checkpointing)
    return model


def activation_bytes(setup: Setup, keeps_scores: bool) -> tuple[int, int]:
    """(bytes a training step keeps for backward, of which the (B, H, T, S) scores), from a meta trace of
    its own meta model (checkpointing and the dtype change it). `keeps_scores`: see kernel_keeps_scores."""
    cfg = setup.model
    model = step_model(setup)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    sizes: dict[int, int] = {}  # bytes of each storage autograd keeps (views of one storage count once)
    heads_scores = setup.batch_size * cfg.n_heads * setup.seq_len**2
    scores: set[int] = set()

    def pack(t: Tensor) -> Tensor:
        key = t.untyped_storage()._cdata
        if key not in params:
            sizes[key] = t.untyped_storage().nbytes()
            if t.shape[-2:] == (setup.seq_len, setup.seq_len) and t.numel() == heads_scores:  # (B, H, T, S)
                scores.add(key)
        return t

    handles = _keep_checkpointed_inputs(model, pack)
    idx = torch.zeros(setup.batch_size, setup.seq_len, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _meta_moe(model), _kernel(model, keeps_scores):
        model.loss(idx, idx)
    for handle in handles:
        handle.remove()
    return sum(sizes.values()), sum(sizes[k] for k in scores)


def _kernel(model: Transformer, keeps_scores: bool) -> contextlib.AbstractContextManager:
    """sdpa as the run's device runs it: its math decomposition on meta tensors where the kernel keeps
    the scores, else what a fused kernel keeps."""
    fused = not keeps_scores and model.cfg.attention.get("kernel", "sdpa") == "sdpa"
    return _fused_sdpa() if fused else contextlib.nullcontext()


@contextlib.contextmanager
def _meta_moe(model: Transformer):
    """MoE routing is data-dependent (bincount, split sizes), which meta tensors cannot run: route as if
    balanced and dropless (an upper bound under a capacity factor), with the same tensors kept."""
    from llmkit.model import moe

    layers = [m for m in model.modules() if isinstance(m, moe.MoE)]
    if not layers:
        yield
        return
    real_grouped, real_bincount = moe.grouped_matmul, torch.bincount
    capacities = [m.capacity_factor for m in layers]

    def grouped(x: Tensor, w: Tensor, counts: Tensor, bias: Tensor | None = None) -> Tensor:
        y = x @ w[0]  # keeps x, as the per-expert matmuls keep their slices of it
        return y if bias is None else y + bias[0]

    moe.grouped_matmul = grouped
    torch.bincount = lambda x, weights=None, minlength=0: torch.empty(minlength, dtype=torch.long, device=x.device)
    for m in layers:
        m.capacity_factor = None
    try:
        yield
    finally:
        moe.grouped_matmul, torch.bincount = real_grouped, real_bincount
        for m, capacity in zip(layers, capacities, strict=True):
            m.capacity_factor = capacity


def _keep_checkpointed_inputs(model: Transformer, pack) -> list[Any]:
    """A checkpointed block keeps its input for the recomputation, outside autograd's saved tensors."""
    def keep(module: Any, args: tuple[Tensor, ...]) -> None:
        pack(args[0])

    return [block.register_forward_pre_hook(keep) for block in model.blocks if type(block).__name__ == "CheckpointWrapper"]


# ---- the step's peak: every tensor alive, traced on meta tensors ----------------------------------


# CPU allocator slack. glibc's malloc gives a freed block back to the kernel only when it was mmapped;
# its threshold for mmap rises to each mmapped block freed, up to 32 MiB on 64-bit, so after the first
# step every tensor below 32 MiB lives on the heap, whose freed chunks stay resident (Python's and torch's
# small long-lived objects at the heap's top stop it shrinking) and fragment: the next allocations do not
# fit the holes the backward's frees leave. Measured (scripts/bench_plan.py, 11 configurations, AVX2
# EPYC, torch 2.13, glibc 2.36, two runs): resident set minus runtime minus the traced live tensors was
# 0.15-0.34 of the bytes one backward pass allocates below 32 MiB (gradients of activations, recomputed blocks),
# 0.21-0.33 of the live tensors without checkpointing but 1.0-1.1 with full checkpointing, whose
# recomputation churns the heap; with MALLOC_MMAP_THRESHOLD_=65536 (no dynamic threshold) the slack
# vanished (alibi: 917 MB measured, 485 + 433 planned). With 0.24 the plan was 0.94-1.06x the measured
# peak (1.06x: d_model 256, whose heap kept 0.34); the pre-flight's margin covers the spread.
MMAP_CEILING = 32 * 2**20
CPU_HEAP_SLACK = 0.24


class LiveTensors(TorchDispatchMode):
    """Bytes of every tensor storage alive while a step runs, by what made it: the weights, the forward
    (activations, logits, attention scores and their temporaries), the backward (its working set),
    gradients and the optimizer (states and step temporaries). A storage counts from the op that makes
    it until its last reference dies (a weakref callback), which is when the allocator frees it."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.heap_churn = 0  # bytes the backward passes allocated in blocks glibc keeps on its heap
        self.live: dict[int, tuple[Any, int, str]] = {}  # storage -> (weakref, bytes, part)
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.peak_phase = ""

    def track(self, t: Tensor, part: str | None = None) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            if part is not None:  # a tensor made by one phase, relabelled (a gradient, an optimizer state)
                self._add(self.live[key][2], -self.live[key][1])
                self.live[key] = (*self.live[key][:2], part)
                self._add(part, self.live[key][1])
            return
        size, part = storage.nbytes(), part or self.phase
        self.live[key] = (weakref.ref(storage, lambda _, key=key: self._free(key)), size, part)
        if self.phase == "backward" and size < MMAP_CEILING:
            self.heap_churn += size
        self._add(part, size)

    def _free(self, key: int) -> None:
        _, size, part = self.live.pop(key)
        self._add(part, -size)

    def _add(self, part: str, size: int) -> None:
        self.now[part] = self.now.get(part, 0) + size
        if size > 0 and sum(self.now.values()) > sum(self.peak.values()):
            self.peak, self.peak_phase = dict(self.now), self.phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, Tensor):
                self.track(t)
        return out


def traced_peak(setup: Setup, keeps_scores: bool) -> tuple[dict[str, int], str, int]:
    """(bytes alive at the highest point of a training step, by part; the phase it happens in; the bytes
    one backward pass allocates below glibc's mmap ceiling), from the run's model on meta tensors.
    AdamW's states exist before the traced step, as from the second step on (the first step allocates
    them while the gradients are alive: the same set); with gradient accumulation two micro-batches (the
    first one's gradients stay for the second). Gradient clipping runs as the run's does; the foreach
    step too (its temporaries are lists the size of the parameters), while the fused kernel holds no
    temporaries and torch's for-loop one parameter's, so those step as one tensor of the largest."""
    model = step_model(setup)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, foreach=True)
    for p in params:  # what AdamW's first step allocates (torch.optim.adam's _init_group)
        optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    tracker = LiveTensors()
    for p in [*model.parameters(), *quantized_tensors(model)]:
        tracker.track(p, "weights")
    for state in optimizer.state.values():
        for t in state.values():
            tracker.track(t, "optimizer")
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.track(p.grad, "gradients")) for p in params]
    idx = torch.zeros(setup.batch_size, setup.seq_len, dtype=torch.long, device="meta")
    passes = min(setup.accumulate, 2)
    with tracker, _meta_moe(model), _kernel(model, keeps_scores):
        for _ in range(passes):
            tracker.phase = "forward"
            loss = model.loss(idx, idx).loss
            tracker.phase = "backward"
            loss.backward()
            del loss
        tracker.phase = "optimizer"
        if setup.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        if setup.optimizer == "foreach":
            optimizer.step()
        elif params:
            torch.empty_like(max(params, key=Tensor.numel))
    for hook in hooks:
        hook.remove()
    churn = tracker.heap_churn // passes  # per backward pass
    return {part: size for part, size in tracker.peak.items() if size}, tracker.peak_phase, churn


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, dtype_bytes: int = 4) -> int:
    """Keys and values of every layer for `batch` sequences of `context` tokens; a sliding window
    keeps only its last `window` positions; GQA keeps n_kv_heads heads."""
    kv_heads = cfg.attention.get("n_kv_heads") or cfg.n_heads
    window = cfg.attention.get("window")
    kept = min(context, window) if window else context
    return 2 * cfg.n_layers * batch * kv_heads * kept * cfg.head_dim * dtype_bytes


# ---- the plan ---------------------------------------------------------------------------------------


def parameter_counts(cfg: ModelConfig) -> tuple[dict[str, int], int, int]:
    """(parameters per component, total, active per token), from the model built on the meta device."""
    model = meta_model(cfg)
    return component_params(model), model.num_params(), active_params(model)


def make_plan(setup: Setup, saved_activations: bool = True) -> Plan:
    """The plan of a run; without `saved_activations` (what fitting_changes needs: the peak alone) the
    separate trace of the tensors autograd saves is skipped and memory["activations"] is 0."""
    model = run_model(setup)
    cfg = setup.model
    keeps_scores = kernel_keeps_scores(model, setup.accelerator)
    memory = state_bytes(model, setup)
    memory["activations"], scores = activation_bytes(setup, keeps_scores) if saved_activations else (0, 0)
    traced, phase, churn = traced_peak(setup, keeps_scores)
    peak = peak_tensors(traced, memory, quantized_bytes(model))
    if setup.accelerator == "cpu":  # what glibc keeps resident beyond the live tensors (see CPU_HEAP_SLACK)
        peak["allocator"] = round(CPU_HEAP_SLACK * churn)
    if setup.reference_copy:  # its forward's transients (no_grad) are not traced
        reference = reference_copy_bytes(meta_model(cfg), model, setup.finetune, param_bytes(setup.precision))
        memory["reference"] = peak["reference"] = reference
    if setup.base_bytes:  # loading init_from can be the higher point (a frozen or quantized base)
        loading = load_peak(meta_model(cfg), setup.base_bytes)
        if sum(loading.values()) > sum(peak.values()):
            peak, phase = loading, "load"
    flops = model.flops_per_token(setup.seq_len)  # what MFU counts: the window's keys only
    return Plan(
        params=component_params(model),
        total_params=model.num_params(),
        active_params=active_params(model),
        flops_per_token=flops,
        executed_flops_per_token=flops + 12 * cfg.n_layers * cfg.d_model * masked_keys(cfg, setup.seq_len),
        memory=memory,
        scores_bytes=scores,
        kernel_keeps_scores=keeps_scores,
        tokens_per_step=setup.batch_size * setup.seq_len * setup.accumulate * setup.ranks,
        setup={k: v for k, v in asdict(setup).items() if k != "model"},
        peak=peak,
        peak_phase=phase,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        quantized_bytes=quantized_bytes(model),
    )


def peak_tensors(traced: dict[str, int], memory: dict[str, int], quantized: int = 0) -> dict[str, int]:
    """The traced peak with the states as the run holds them: the trace runs unsharded, in the dtype of
    the activations, so weights come from `memory` (fp32 masters, FSDP shards and gathered blocks), and
    the gradients and optimizer states alive at the peak are scaled by the same ratio. `quantized`: bytes of
    a QLoRA base's codes and scales, in both weights and neither cast nor sharded."""
    peak = {"weights": memory["weights"] + memory.get("fsdp_gathered", 0)}
    params = traced.get("weights", 0) - quantized
    if memory["weights"] != traced.get("weights", 0) and not memory.get("fsdp_gathered"):
        # mixed precision: autocast's 16-bit copies of the weights, which the backward keeps (the trace's)
        peak["weights"] += params
    state = (memory["weights"] - quantized) / max(1, params)  # the shard and dtype ratio of the states
    for part in ("gradients", "optimizer"):
        if traced.get(part):
            peak[part] = round(traced[part] * state)
    peak["activations"] = traced.get("forward", 0)  # made by the forward, alive at the peak
    peak["working set"] = traced.get("backward", 0)  # the backward's gradients of activations and temporaries
    return peak


def train_time(plan: Plan, tokens: float, mfu: float, peak_flops: float, devices: int) -> dict[str, float]:
    """Tokens/s, days and device-hours to train `tokens` at `mfu` of `peak_flops` per device."""
    tokens_per_s = mfu * peak_flops * devices / plan.flops_per_token
    seconds = tokens / tokens_per_s
    return {"tokens_per_s": tokens_per_s, "days": seconds / 86400, "device_hours": seconds * devices / 3600}


def chinchilla_loss(n: float, d: float) -> float:
    c = CHINCHILLA
    return c["E"] + c["A"] / n ** c["alpha"] + c["B"] / d ** c["beta"]


def compute_optimal(flops: float) -> tuple[float, float]:
    """(N, D) minimising L(N, D) under 6·N·D = flops, in closed form (Chinchilla Approach 3):
    N = G·(C/6)^(beta/(alpha+beta)), G = (alpha·A / (beta·B))^(1/(alpha+beta))."""
    c = CHINCHILLA
    a, b = c["alpha"], c["beta"]
    g = (a * c["A"] / (b * c["B"])) ** (1 / (a + b))
    n = g * (flops / 6) ** (b / (a + b))
    return n, flops / (6 * n)


# ---- the process around the step: its runtime and the allocator's slack ----------------------------

# A fresh process doing what `llmkit train` does before its model has any size: the imports and one
# step of a tiny model (thread pools, oneDNN's caches and the autograd engine start on the first step).
_PROBE = """
import torch, lightning, llmkit.train, llmkit.commands.train
from llmkit.model import ModelConfig, Transformer
model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))
idx = torch.zeros(2, 16, dtype=torch.long)
model.loss(idx, idx).loss.backward()
torch.optim.AdamW(model.parameters(), fused=True).step()
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) * 1024)
"""
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork and exec, so a probe started by a large
# process (a notebook, a test session at 1.7 GB) would report its parent's peak; VmHWM belongs to the new image
# GPU (not measured here: no GPU was lent): the caching allocator's max_memory_reserved above
# max_memory_allocated (2 MiB segments, blocks it cannot split), and the CUDA context, which neither counts.
GPU_ALLOCATOR_SLACK = 0.1
GPU_CONTEXT_BYTES = GIB // 2


def machine_key() -> str:
    """What the runtime's size depends on: Python, torch, Lightning, the CPU model, torch's threads, and the
    llmkit checkout imported (another checkout imports other sources; one without compiled bytecode, under
    PYTHONDONTWRITEBYTECODE, compiles every module at each start: measured +68 MB here)."""
    import platform
    import sys
    from importlib.metadata import version

    import llmkit

    cpu = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    bytecode = "no bytecode written" if sys.dont_write_bytecode else "bytecode"
    return (f"python {platform.python_version()} torch {torch.__version__} lightning {version('lightning')} "
            f"{cpu} threads {torch.get_num_threads()} llmkit {Path(llmkit.__file__).parent} {bytecode}")


def process_baseline() -> tuple[int, str]:
    """(peak resident bytes of a training process whose model is tiny, where the figure comes from):
    measured once per machine kind in a fresh process (about 10 s) and cached in
    ~/.cache/llmkit/process_baseline.json ($LLMKIT_CACHE moves it)."""
    import json
    import subprocess
    import sys

    path = Path(os.environ.get("LLMKIT_CACHE", Path.home() / ".cache" / "llmkit")) / "process_baseline.json"
    key = machine_key()
    known = json.loads(path.read_text()) if path.exists() else {}
    if key not in known:
        probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True)
        if probe.returncode != 0:
            raise RuntimeError(f"measuring the training process's runtime failed (preflight=off skips the "
                               f"pre-flight):\n{probe.stderr[-2000:]}")
        known[key] = int(probe.stdout.split()[-1])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # another process may measure at the same time
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)
    return known[key], f"measured for {key}"


def process_rss() -> int:
    """This process's resident set now."""
    return int(next((line.split()[1] for line in _lines("/proc/self/status") if line.startswith("VmRSS:")), 0)) * 1024


def with_runtime(plan: Plan, setup: Setup, in_process: bool = False) -> Plan:
    """Complete the peak with what the machine adds to the traced tensors. CPU: the process's runtime (the
    fresh-process measurement, or, with `in_process`, this process's resident set when that is larger: a
    training process that has grown, in a notebook or a multirun, keeps what it holds) and the loader's
    batches (make_plan traced glibc's slack). GPU: the CUDA context and the caching allocator's slack.
    Calling it again replaces what it added."""
    if setup.accelerator == "gpu":
        tensors = sum(v for k, v in plan.peak.items() if k not in ("runtime", "allocator"))
        plan.peak["runtime"] = GPU_CONTEXT_BYTES
        plan.peak["allocator"] = round(GPU_ALLOCATOR_SLACK * tensors)
        return plan
    plan.peak["runtime"] = max(process_baseline()[0], process_rss() if in_process else 0)
    plan.peak["loader"] = 2 * 2 * setup.batch_size * setup.seq_len * 8  # inputs and targets (int64), one batch ahead
    return plan


def _lines(path: str) -> list[str]:
    try:
        return open(path).read().splitlines()
    except OSError:
        return []


# ---- from a composed config ------------------------------------------------------------------------

def setup_from_config(cfg: Any) -> Setup:
    """A Setup from a composed `train` config (what `llmkit train` would run)."""
    from omegaconf import OmegaConf

    if cfg.get("init_from"):  # post-training: the base model's config, whatever cfg.model says
        from llmkit.posttrain.base import base_config

        model = base_config(cfg.init_from).to_dict()
    else:
        model = OmegaConf.to_container(cfg.model, resolve=True)
    if model.get("vocab_size") is None:  # taken from the tokenizer when the data is prepared
        model["vocab_size"] = 256 if cfg.data.get("tokenizer") == "char" else int(cfg.data.vocab_size)
    task = cfg.get("task", {})
    pairs = task.get("name") in ("dpo", "reward")  # a chosen and a rejected row per sample
    trainer = cfg.trainer
    strategy = trainer.get("strategy")
    target = strategy.get("_target_", "") if OmegaConf.is_dict(strategy) else str(strategy)
    devices = trainer.get("devices", 1)
    return Setup(
        model=ModelConfig.from_dict(model),
        batch_size=int(cfg.data.batch_size) * (2 if pairs else 1),
        seq_len=int(cfg.data.seq_len or model["max_seq_len"]),
        precision=str(trainer.get("precision", "32")),
        checkpointing=str(cfg.get("activation_checkpointing", "none")),
        ranks=(devices if isinstance(devices, int) else 1) * int(trainer.get("num_nodes", 1)),
        sharded="FSDP" in target.upper(),
        accelerator="gpu" if trainer.get("accelerator") in ("gpu", "cuda") else "cpu",
        peak_flops=trainer.get("peak_flops_per_device"),
        accumulate=int(trainer.get("accumulate_grad_batches", 1)),
        optimizer=_adamw_kind(cfg.get("optim", {}).get("fused"), trainer.get("accelerator")),
        clip_grad=bool(trainer.get("gradient_clip_val")),
        finetune=finetune_options(cfg),
        base_bytes=base_file_bytes(cfg.get("init_from")),
        reference_copy=task.get("name") == "dpo" and task.get("reference", "copy") == "copy",
    )


def _adamw_kind(fused: bool | None, accelerator: str | None) -> str:
    """fused: true | false (foreach) | null: torch's choice, foreach on a GPU and its for-loop on the CPU."""
    if fused is None:
        return "foreach" if accelerator in ("gpu", "cuda") else "single"
    return "fused" if fused else "foreach"


def available_memory(setup: Setup) -> tuple[int, str]:
    """(bytes one rank may use, where that figure comes from): the GPU's memory, or the RAM available
    now shared by this node's ranks."""
    if setup.accelerator == "gpu" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        return total, f"{torch.cuda.get_device_name(0)}: {total / GIB:.1f} GiB"
    available = _meminfo("MemAvailable")
    per_node = max(1, setup.ranks)  # CPU ranks of a rehearsal share this machine's memory
    return available // per_node, f"RAM available now: {available / GIB:.1f} GiB" + (
        f", shared by {per_node} ranks" if per_node > 1 else "")


def _meminfo(key: str) -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fitting_changes(setup: Setup, limit: int, margin: float = 0.0, runtime: int | None = None) -> list[tuple[str, int]]:
    """Changes to the run that bring its peak (plus `margin`) under `limit` bytes, with their peaks: the
    largest micro-batch (with accumulation keeping the tokens per step), full activation
    checkpointing, sharding, the longest context; each kind tried on its own. `runtime`: the process's
    runtime as the refused plan counted it (with_runtime's otherwise)."""

    batches, batch, accumulate = [], setup.batch_size, setup.accumulate
    while batch > 1:
        batch, accumulate = batch // 2, accumulate * 2
        batches.append((f"data.batch_size={batch} trainer.accumulate_grad_batches={accumulate} (same tokens per step)",
                        replace(setup, batch_size=batch, accumulate=accumulate)))
    contexts, seq_len = [], setup.seq_len
    while seq_len > 64:
        seq_len //= 2
        shorter = replace(setup, seq_len=seq_len, model=replace(setup.model, max_seq_len=seq_len))
        contexts.append((f"data.seq_len={seq_len}", shorter))
    kinds = [batches, contexts]
    if setup.checkpointing != "full":
        kinds.insert(1, [("activation_checkpointing=full", replace(setup, checkpointing="full"))])
    if setup.ranks > 1 and not setup.sharded:
        kinds.insert(2, [(f"an fsdp trainer (weights, gradients and optimizer sharded over {setup.ranks} ranks)",
                          replace(setup, sharded=True))])
    kinds += [[change] for change in lighter_runs(setup)]
    fits = []
    for kind in kinds:
        for text, candidate in kind:
            plan = with_runtime(make_plan(candidate, saved_activations=False), candidate)
            total = plan.peak_memory + (runtime - plan.peak["runtime"] if runtime is not None else 0)
            if total * (1 + margin) <= limit:
                fits.append((text, total))
                break
    return fits


# ---- text ------------------------------------------------------------------------------------------


def describe(plan: Plan, setup: Setup) -> str:
    cfg = setup.model
    lines = [f"parameters: {plan.total_params:,} total, {plan.active_params:,} active per token"]
    lines += [f"  {name:<14} {count:>15,}" for name, count in plan.params.items()]
    lines.append(describe_finetune(setup.finetune, plan.trainable_params, plan.total_params, plan.quantized_bytes))
    lines.append(f"FLOPs per token (training, 6N + attention): {plan.flops_per_token:.4g}"
                 + (f"; the kernel executes {plan.executed_flops_per_token:.4g} (a masked window computes every score)"
                    if plan.executed_flops_per_token != plan.flops_per_token else ""))
    where = "sharded over " + str(setup.ranks) + " ranks" if setup.sharded else "per rank"
    lines.append(f"memory per rank ({setup.precision}, micro-batch {setup.batch_size} x {setup.seq_len} tokens, "
                 f"activation_checkpointing={setup.checkpointing}; states {where}):")
    for name, size in plan.memory.items():
        note = ""
        if name == "activations" and plan.scores_bytes:
            note = f"  of which attention scores (B, H, T, T): {_gib(plan.scores_bytes)}"
        elif name == "activations":
            note = "  (fused attention kernel: no (T, T) scores kept)"
        lines.append(f"  {name:<14} {_gib(size):>12}{note}")
    lines.append(f"  {'total':<14} {_gib(plan.total_memory):>12}  (the tensors a step holds)")
    if plan.peak:
        where = "while loading the base" if plan.peak_phase == "load" else f"in the {plan.peak_phase} pass"
        lines.append(f"peak of the process per rank ({where}; the pre-flight's figure):")
        lines += [f"  {name:<14} {_gib(size):>12}  {PEAK_PARTS.get(name, '')}" for name, size in plan.peak.items()]
        lines.append(f"  {'peak':<14} {_gib(plan.peak_memory):>12}")
    kv = kv_cache_bytes(cfg, cfg.max_seq_len, 1, param_bytes(setup.precision))
    lines.append(f"KV cache for generation: {_gib(kv)} per sequence of {cfg.max_seq_len} tokens")
    return "\n".join(lines)


PEAK_PARTS = {
    "weights": "fsdp: the shard and two gathered blocks; mixed precision: and autocast's 16-bit copies; qlora: codes and scales",
    "checkpoint": "loading: the base checkpoint file's tensors, beside the full-precision model built for them",
    "reference": "DPO's reference=copy: a frozen copy of the base (qlora: of the quantized base)",
    "gradients": "alive at the peak",
    "optimizer": "AdamW's states and step temporaries alive at the peak",
    "activations": "made by the forward and still alive: saved tensors, logits, (B, H, T, T) scores",
    "working set": "made by the backward: gradients of activations and logits, recomputed blocks, temporaries",
    "runtime": "the process itself: interpreter, torch, Lightning, thread pools (measured once per machine)",
    "loader": "a batch of inputs and targets, and the next one",
    "allocator": "slack: glibc's heap keeps freed blocks resident (CPU); the caching allocator's segments (GPU)",
}


def _gib(size: int) -> str:
    return f"{size / GIB:.3f} GiB" if size < 100 * GIB else f"{size / GIB:,.0f} GiB"


# ---- the pre-flight check of `llmkit train` --------------------------------------------------------


class PlanError(RuntimeError):
    """The run's estimate does not fit the device: raised before anything is allocated."""


def preflight(cfg: Any, in_process: bool = True) -> Plan | None:
    """Estimate the peak of a composed train config's run and stop it (preflight=error, the default), warn
    (warn) or do nothing (off) when that peak plus `preflight_margin` exceeds what one rank may use:
    `preflight_limit` bytes when set, else the GPU's memory or the RAM available now. `in_process`: the
    caller is the training process (see with_runtime)."""
    mode = str(cfg.get("preflight", "error"))
    if mode not in ("error", "warn", "off"):
        raise ValueError(f"preflight={mode}: valid values are error, warn, off")
    if mode == "off":
        return None
    margin = float(cfg.get("preflight_margin", 0.1))
    if not 0 <= margin < 1:
        raise ValueError(f"preflight_margin={margin}: give a fraction in [0, 1), e.g. 0.1 for 10% headroom")
    setup = setup_from_config(cfg)
    plan = with_runtime(make_plan(setup), setup, in_process)
    limit, where = available_memory(setup)
    if cfg.get("preflight_limit") is not None:
        limit, where = int(float(cfg.preflight_limit)), f"preflight_limit={cfg.preflight_limit}"
    if plan.peak_memory * (1 + margin) <= limit:
        return plan
    message = refusal(plan, setup, limit, where, margin)
    if mode == "error":
        raise PlanError(message)
    import logging

    logging.getLogger(__name__).warning(message)
    return plan


def refusal(plan: Plan, setup: Setup, limit: int, where: str, margin: float = 0.0) -> str:
    parts = {k: v for k, v in plan.peak.items() if k != "runtime"}
    largest = max(parts, key=parts.get)
    because = (f"the attention scores (B, H, T, T) alone take {_gib(plan.scores_bytes)}"
               if plan.scores_bytes > plan.peak_memory / 2 else f"{largest} take {_gib(parts[largest])}")
    lines = [f"pre-flight: this run's peak is about {_gib(plan.peak_memory)} per rank (+{margin:.0%} margin: "
             f"{_gib(round(plan.peak_memory * (1 + margin)))}), but {where} ({_gib(limit)} per rank): {because}.",
             describe(plan, setup)]
    changes = fitting_changes(setup, limit, margin, plan.peak.get("runtime"))
    if changes:
        lines.append("these changes would fit (peak with its margin under the limit):")
        lines += [f"  {text}: peak about {_gib(total)}" for text, total in changes]
    elif plan.peak.get("runtime", 0) * (1 + margin) > limit:
        lines.append(f"the process alone (runtime: {_gib(plan.peak['runtime'])}) does not fit: raise the limit or free memory")
    else:
        lines.append("no single change tried (smaller micro-batch, activation checkpointing, fsdp, shorter context) fits")
    lines.append("(`llmkit plan <overrides>` prints this estimate; preflight=warn or preflight=off runs anyway)")
    return "\n".join(lines)

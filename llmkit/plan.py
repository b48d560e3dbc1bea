"""Plan a run before it starts: parameters, FLOPs, memory per rank, time and Chinchilla sizing.

Everything comes from the composed config, touching no data. The model is built on the meta device
(no memory), so parameter counts are exact for every registry combination, and the activations a
training step keeps for backward are found by running that step on meta tensors and adding up what
autograd saves (`saved_tensors_hooks`), with activation checkpointing applied as the run applies it.
Only the attention kernel is modelled rather than traced: a fused kernel (sdpa's flash or
memory-efficient paths, flex, xformers) keeps q, k, v, the output and a log-sum-exp per row; the
eager kernel, and sdpa's math fallback on the CPU with dropout, keep the (B, H, T, S) scores.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from llmkit.model import ModelConfig, Transformer

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

    @property
    def total_memory(self) -> int:
        return sum(self.memory.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_memory": self.total_memory}


# ---- parameters and FLOPs ---------------------------------------------------------------------------


def meta_model(cfg: ModelConfig) -> Transformer:
    """The model with meta tensors: shapes without memory, built by the same registries as a run."""
    with torch.device("meta"):
        return Transformer(cfg)


def component_params(model: Transformer) -> dict[str, int]:
    """Parameters per component, each tensor once (a tied head is the embedding)."""
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():  # named_parameters yields a shared tensor once
        groups[_component(name)] = groups.get(_component(name), 0) + p.numel()
    return groups


def _component(name: str) -> str:
    parts = name.split(".")
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
    states = {"weights": elements * size, "gradients": trainable * size, "optimizer": 2 * trainable * size + 4 * tensors}
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


def activation_bytes(setup: Setup, keeps_scores: bool) -> tuple[int, int]:
    """(bytes a training step keeps for backward, of which the (B, H, T, S) scores), from a meta trace of
    its own meta model (checkpointing and the dtype change it). `keeps_scores`: see kernel_keeps_scores."""
    from llmkit.recompute import apply_activation_checkpointing

    cfg = setup.model
    model = meta_model(cfg).train()
    if setup.precision in ("bf16-true", "bf16", "bf16-mixed"):  # mixed: autocast keeps matmul activations in bf16
        model = model.to(torch.bfloat16)
    elif setup.precision in ("16-true", "16", "16-mixed"):
        model = model.to(torch.float16)
    apply_activation_checkpointing(model, setup.checkpointing)
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
    fused = not keeps_scores and cfg.attention.get("kernel", "sdpa") == "sdpa"
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _meta_moe(model):
        with _fused_sdpa() if fused else contextlib.nullcontext():
            model.loss(idx, idx)
    for handle in handles:
        handle.remove()
    return sum(sizes.values()), sum(sizes[k] for k in scores)


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


def make_plan(setup: Setup) -> Plan:
    model = meta_model(setup.model)
    cfg = setup.model
    keeps_scores = kernel_keeps_scores(model, setup.accelerator)
    memory = state_bytes(model, setup)
    memory["activations"], scores = activation_bytes(setup, keeps_scores)
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
    )


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


# ---- from a composed config ------------------------------------------------------------------------

CPU_RUNTIME_BYTES = GIB // 2  # the interpreter, torch and Lightning themselves, per process
GPU_RUNTIME_BYTES = GIB  # CUDA context and allocator slack


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
    pairs = cfg.get("task", {}).get("name") in ("dpo", "reward")  # a chosen and a rejected row per sample
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
    )


def with_runtime(plan: Plan, setup: Setup) -> Plan:
    plan.memory["runtime"] = GPU_RUNTIME_BYTES if setup.accelerator == "gpu" else CPU_RUNTIME_BYTES
    return plan


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


def fitting_changes(setup: Setup, limit: int) -> list[tuple[str, int]]:
    """Changes to the run that bring the estimate under `limit` bytes, with their estimates: the
    largest micro-batch (with accumulation keeping the tokens per step), full activation
    checkpointing, sharding, the longest context; each kind tried on its own."""

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
    fits = []
    for kind in kinds:
        for text, candidate in kind:
            total = with_runtime(make_plan(candidate), candidate).total_memory
            if total <= limit:
                fits.append((text, total))
                break
    return fits


# ---- text ------------------------------------------------------------------------------------------


def describe(plan: Plan, setup: Setup) -> str:
    cfg = setup.model
    lines = [f"parameters: {plan.total_params:,} total, {plan.active_params:,} active per token"]
    lines += [f"  {name:<14} {count:>15,}" for name, count in plan.params.items()]
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
    lines.append(f"  {'total':<14} {_gib(plan.total_memory):>12}")
    kv = kv_cache_bytes(cfg, cfg.max_seq_len, 1, param_bytes(setup.precision))
    lines.append(f"KV cache for generation: {_gib(kv)} per sequence of {cfg.max_seq_len} tokens")
    return "\n".join(lines)


def _gib(size: int) -> str:
    return f"{size / GIB:.3f} GiB" if size < 100 * GIB else f"{size / GIB:,.0f} GiB"


# ---- the pre-flight check of `llmkit train` --------------------------------------------------------


class PlanError(RuntimeError):
    """The run's estimate does not fit the device: raised before anything is allocated."""


def preflight(cfg: Any) -> Plan | None:
    """Estimate the run of a composed train config and stop it (preflight=error, the default), warn
    (warn) or do nothing (off) when it needs more memory than the device has."""
    mode = str(cfg.get("preflight", "error"))
    if mode not in ("error", "warn", "off"):
        raise ValueError(f"preflight={mode}: valid values are error, warn, off")
    if mode == "off":
        return None
    setup = setup_from_config(cfg)
    plan = with_runtime(make_plan(setup), setup)
    limit, where = available_memory(setup)
    if plan.total_memory <= limit:
        return plan
    message = refusal(plan, setup, limit, where)
    if mode == "error":
        raise PlanError(message)
    import logging

    logging.getLogger(__name__).warning(message)
    return plan


def refusal(plan: Plan, setup: Setup, limit: int, where: str) -> str:
    largest = max(plan.memory, key=plan.memory.get)
    because = (f"the attention scores (B, H, T, T) alone take {_gib(plan.scores_bytes)}"
               if plan.scores_bytes > plan.total_memory / 2 else f"{largest} take {_gib(plan.memory[largest])}")
    lines = [f"pre-flight: this run needs about {_gib(plan.total_memory)} per rank, but {where} "
             f"({_gib(limit)} per rank): {because}.", describe(plan, setup)]
    changes = fitting_changes(setup, limit)
    if changes:
        lines.append("these changes would fit:")
        lines += [f"  {text}: about {_gib(total)}" for text, total in changes]
    else:
        lines.append("no single change tried (smaller micro-batch, activation checkpointing, fsdp, shorter context) fits")
    lines.append("(`llmkit plan <overrides>` prints this estimate; preflight=warn or preflight=off runs anyway)")
    return "\n".join(lines)

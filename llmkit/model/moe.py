"""Mixture-of-Experts feed-forward layer: `model/ffn=moe` (options in conf/model/ffn/moe.yaml).

A router scores the experts for every token and sends it to its top_k; the token's output is the
routing-weighted sum of those experts' outputs (plus shared experts that every token uses).

Dispatch is a permutation, never a loop over tokens:

    x (N, C) -> router -> (expert, weight) for each of the N * k assignments
      -> argsort by expert: each expert's assignments form one contiguous slice (bincount = slice sizes)
      -> one grouped matmul over the slices (`F.grouped_mm`), else one matmul per expert on its slice
      -> scale by the weights, add each output back to its token (index_add)

With `capacity_factor` set, each expert takes at most ceil(capacity_factor * N * k / n_experts)
assignments per batch while training (first choices before second choices, then batch order) and
the rest are dropped: the token keeps only its residual for that choice. Dropping makes a token's
output depend on other tokens of the batch, so evaluation and sampling always route dropless.

The layer reports its weighted auxiliary losses (`AuxLossProvider`: the Switch/GShard balancing
loss and the ST-MoE router z-loss) and its statistics (`MetricsProvider`: per-expert load, router
entropy, dropped fraction), which the transformer collects after each forward.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.model.ffn import FFNS, MLP, SwiGLU, hidden_size
from llmkit.registry import Registry

ROUTERS: Registry["SoftmaxRouter"] = Registry("moe router")
EXPERTS: Registry["MLPExperts"] = Registry("moe expert")


# ---- routers ----------------------------------------------------------------------------------------
@dataclass
class Routing:
    logits: Tensor  # (N, E) fp32 router logits
    probs: Tensor  # (N, E) routing distribution over experts, rows sum to 1 (for the balancing loss)
    experts: Tensor  # (N, k) chosen experts, best first
    weights: Tensor  # (N, k) their weights in the token's output


@ROUTERS.register("softmax")
class SoftmaxRouter(nn.Module):
    """Softmax over the experts, then top-k (Switch, GShard, Mixtral)."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, normalize_weights: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, n_experts, bias=False)
        self.top_k, self.normalize_weights = top_k, normalize_weights

    def affinity(self, logits: Tensor) -> Tensor:
        return logits.softmax(dim=-1)

    def distribution(self, scores: Tensor) -> Tensor:
        return scores  # a softmax already sums to 1

    def forward(self, x: Tensor) -> Routing:
        with torch.autocast(_autocast_device(x), enabled=False):  # routing decisions in fp32 (Switch, section 2.4)
            logits = F.linear(x.float(), self.proj.weight.float())  # (N, E)
        scores = self.affinity(logits)  # (N, E)
        top, experts = scores.topk(self.top_k, dim=-1)  # (N, k)
        weights = top / top.sum(dim=-1, keepdim=True) if self.normalize_weights else top
        return Routing(logits, self.distribution(scores), experts, weights)


@ROUTERS.register("sigmoid")
class SigmoidRouter(SoftmaxRouter):
    """An independent sigmoid score per expert, then top-k (DeepSeek-V3); the balancing loss
    uses the scores normalised over the experts."""

    def affinity(self, logits: Tensor) -> Tensor:
        return logits.sigmoid()

    def distribution(self, scores: Tensor) -> Tensor:
        return scores / scores.sum(dim=-1, keepdim=True)


def _autocast_device(x: Tensor) -> str:
    """autocast knows no meta device, on which llmkit/plan.py traces the model: never enabled there."""
    return "cpu" if x.device.type == "meta" else x.device.type


# ---- experts ----------------------------------------------------------------------------------------
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.cache
@torch.compiler.disable
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Probed once per device and dtype: older torch versions lack some of them."""
    try:
        x, w = torch.zeros(8, 16, device=device, dtype=dtype), torch.zeros(2, 16, 16, device=device, dtype=dtype)
        _GROUPED_MM(x, w, offs=torch.tensor([4, 8], device=device, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _grouped_mm_applies(x: Tensor, w: Tensor) -> bool:
    """grouped_mm runs bf16 on CUDA (sm80+) and CPU (torch 2.13), and fp32 on CPU outside torch.compile
    (whose shape check accepts bf16 only); every row stride must be a multiple of 16 bytes."""
    if _GROUPED_MM is None or x.dtype != w.dtype or not (x.is_contiguous() and w.is_contiguous()):
        return False
    if x.dtype != torch.bfloat16 and (x.device.type != "cpu" or torch.compiler.is_compiling()):
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    aligned = (x.size(-1) * x.element_size()) % 16 == 0 and (w.size(-1) * w.element_size()) % 16 == 0
    return aligned and (torch.compiler.is_compiling() or _grouped_mm_runs(x.device, x.dtype))


def grouped_matmul(x: Tensor, w: Tensor, counts: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (M, I), rows sorted by group with counts[g] rows in group g; w (G, I, O) -> (M, O): each
    group's rows times its own matrix. One grouped matmul where torch has one, else a matmul per group."""
    if torch.is_autocast_enabled(_autocast_device(x)):  # autocast does not cover grouped_mm: cast as it would
        dtype = torch.get_autocast_dtype(_autocast_device(x))
        x, w, bias = x.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype)
    if _grouped_mm_applies(x, w):
        y = _GROUPED_MM(x, w, offs=counts.cumsum(0).to(torch.int32))
    else:
        y = torch.cat([rows @ w_g for rows, w_g in zip(x.split(counts.tolist()), w.unbind(0), strict=True)])
    if bias is not None:
        y = y + bias.repeat_interleave(counts, dim=0, output_size=x.size(0))
    return y


@EXPERTS.register("mlp")
class MLPExperts(nn.Module):
    """n_experts GELU MLPs as stacked (E, in, out) weights, so one grouped matmul serves them all."""

    dense = MLP  # the dense FFN with the same maths: sizes default to its defaults
    in_width = 1  # columns of the input projection per hidden unit

    def __init__(self, n_experts: int, d_model: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, self.in_width * hidden))
        self.w_out = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.b_in = nn.Parameter(torch.zeros(n_experts, self.in_width * hidden)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(n_experts, d_model)) if bias else None

    def init_parameters(self, std: float, residual_std: float) -> None:
        """Called by `init_weights`: as for the dense FFN's Linear layers, w_out writes the residual stream."""
        nn.init.normal_(self.w_in, 0.0, std)
        nn.init.normal_(self.w_out, 0.0, residual_std)
        for b in (self.b_in, self.b_out):
            if b is not None:
                nn.init.zeros_(b)

    def activation(self, h: Tensor) -> Tensor:
        return F.gelu(h)

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        """x (M, C) sorted by expert, counts (E,) rows per expert -> (M, C)."""
        h = self.activation(grouped_matmul(x, self.w_in, counts, self.b_in))  # (M, H)
        return grouped_matmul(h, self.w_out, counts, self.b_out)


@EXPERTS.register("swiglu")
class SwiGLUExperts(MLPExperts):
    """n_experts SwiGLU FFNs; gate and up projections share one (E, C, 2H) weight."""

    dense = SwiGLU
    in_width = 2

    def activation(self, h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up


# ---- the layer ----------------------------------------------------------------------------------------
class MoE(nn.Module):
    """Routed experts (+ optional shared experts); see the module docstring and conf/model/ffn/moe.yaml."""

    def __init__(
        self,
        d_model: int,
        n_experts: int = 8,
        top_k: int = 2,
        expert: str = "swiglu",
        hidden_mult: float | None = None,
        multiple_of: int | None = None,
        router: str = "softmax",
        normalize_weights: bool = True,
        balance_coef: float = 0.01,
        z_coef: float = 0.001,
        capacity_factor: float | None = None,
        n_shared_experts: int = 0,
        bias: bool = False,
        dropout: float = 0.0,
        layer: int = 0,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be between 1 and n_experts={n_experts}, got {top_k}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or null (dropless), got {capacity_factor}")
        experts_cls = EXPERTS.get(expert)
        dense_defaults = inspect.signature(experts_cls.dense).parameters
        if hidden_mult is None:  # the dense FFN's width split over the active experts: equal active parameters
            hidden_mult = dense_defaults["hidden_mult"].default / top_k
        if multiple_of is None:
            multiple_of = dense_defaults["multiple_of"].default
        self.n_experts, self.top_k, self.capacity_factor, self.layer = n_experts, top_k, capacity_factor, layer
        self.balance_coef, self.z_coef = balance_coef, z_coef
        self.router = ROUTERS.get(router)(d_model, n_experts, top_k, normalize_weights)
        self.experts = experts_cls(n_experts, d_model, hidden_size(d_model, hidden_mult, multiple_of), bias)
        self.shared = None
        if n_shared_experts:  # one dense FFN as wide as n_shared_experts experts (DeepSeekMoE)
            self.shared = experts_cls.dense(
                d_model, hidden_mult=hidden_mult * n_shared_experts, multiple_of=multiple_of, bias=bias
            )
        self.dropout = nn.Dropout(dropout)
        self._aux: dict[str, Tensor] = {}
        self._metrics: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        shape, C = x.shape, x.size(-1)
        x = x.reshape(-1, C)  # (N, C)
        N = x.size(0)
        route = self.router(x)
        experts = route.experts.t().reshape(-1)  # (k*N,) choice-major: first choices claim capacity first
        weights = route.weights.t().reshape(-1)  # (k*N,)
        counts = torch.bincount(experts, minlength=self.n_experts)  # (E,) assignments per expert
        order = experts.argsort(stable=True)  # assignment ids grouped by expert, in priority order
        order, kept = self._within_capacity(order, counts, N)
        tokens = order % N  # assignment a = choice * N + token
        y = self.experts(x.index_select(0, tokens), kept)  # (M, C), each expert on its contiguous slice
        y = y * weights[order, None].to(y.dtype)
        out = y.new_zeros(N, C).index_add_(0, tokens, y)  # un-permute, summing each token's k outputs
        if self.shared is not None:
            out = out + self.shared(x)
        self._record(route, counts, kept)
        return self.dropout(out).view(shape)

    def _within_capacity(self, order: Tensor, counts: Tensor, n_tokens: int) -> tuple[Tensor, Tensor]:
        """Keep each expert's first `capacity` assignments; dropless (None) or evaluating keeps all."""
        if self.capacity_factor is None or not self.training:
            return order, counts
        capacity = math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(order.numel(), device=order.device)
        rank = rank - starts.repeat_interleave(counts, output_size=order.numel())  # position in its expert's slice
        return order[rank < capacity], counts.clamp(max=capacity)

    def _record(self, route: Routing, counts: Tensor, kept: Tensor) -> None:
        load = counts.float() / counts.sum()  # f_i: share of assignments routed to expert i, before drops
        importance = route.probs.mean(dim=0)  # P_i: mean routing probability of expert i
        self._aux = {}
        if self.balance_coef:  # E * sum_i f_i P_i: 1 when f or P is uniform (Switch eq. 4, GShard)
            self._aux["balance"] = self.balance_coef * self.n_experts * (load * importance).sum()
        if self.z_coef:  # mean squared log-partition of the router logits (ST-MoE eq. 5)
            self._aux["z"] = self.z_coef * torch.logsumexp(route.logits, dim=-1).square().mean()
        with torch.no_grad():
            prefix = f"moe/layer{self.layer}/"
            entropy = -torch.special.xlogy(route.probs, route.probs).sum(dim=-1).mean()
            self._metrics = {f"{prefix}load_e{i}": f for i, f in enumerate(load.unbind())}
            self._metrics[f"{prefix}router_entropy"] = entropy
            self._metrics[f"{prefix}dropped_frac"] = 1 - kept.sum() / counts.sum()

    def pop_aux_losses(self) -> dict[str, Tensor]:
        aux, self._aux = self._aux, {}
        return aux

    def pop_metrics(self) -> dict[str, Tensor]:
        metrics, self._metrics = self._metrics, {}
        return metrics

    def inactive_params(self) -> int:
        """Expert parameters a token does not use: FLOP counts use active parameters only."""
        return sum(p.numel() for p in self.experts.parameters()) * (self.n_experts - self.top_k) // self.n_experts


_MOE_OPTIONS = inspect.signature(MoE)


@FFNS.register("moe")
def moe(d_model: int, layer: int = 0, every: int = 1, expert: str = "swiglu", **options: object) -> nn.Module:
    """MoE in the layers with layer % every == every - 1 (every=1: all; 2: the 2nd, 4th, ...); the
    other layers get the dense FFN of the expert type with its default sizes."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    _MOE_OPTIONS.bind(d_model, expert=expert, **options)  # a misspelt option fails on every layer
    EXPERTS.get(expert)
    if layer % every != every - 1:
        dense = {k: v for k, v in options.items() if k in ("bias", "dropout")}
        return FFNS.build(expert, d_model=d_model, **dense)
    return MoE(d_model, expert=expert, layer=layer, **options)

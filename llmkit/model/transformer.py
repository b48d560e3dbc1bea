"""The decoder-only transformer: embed -> blocks -> norm -> head. Start reading here.

Every part is built by name from a registry (block, norm, attention, position, ffn), so the
forward below is the same for GPT-2, the classic post-LN transformer and Llama-style models.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.model.attention import ATTENTION
from llmkit.model.block import BLOCKS
from llmkit.model.config import ModelConfig
from llmkit.model.ffn import FFNS, AuxLossProvider, MetricsProvider
from llmkit.model.init import init_weights
from llmkit.model.norm import NORMS
from llmkit.model.positions import POSITIONS
from llmkit.registry import Registry


@dataclass
class LossOutput:
    loss: Tensor  # what the optimizer minimises: cross-entropy plus auxiliary losses
    ce: Tensor  # language-modelling cross-entropy alone (nats per token)
    logits: Tensor  # (B, T, V)
    aux: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached statistics to log (MoE load...)


def build(registry: Registry[Any], spec: dict[str, Any], where: str, **shared: Any) -> Any:
    """Build `spec["name"]` from `registry` with the spec's options plus model-level values."""
    options = {k: v for k, v in spec.items() if k != "name"}
    try:
        return registry.build(spec["name"], **shared, **options)
    except TypeError as err:  # an option the component does not take
        raise TypeError(f"model.{where}={spec['name']}: {err}") from err


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position = build(
            POSITIONS, cfg.position, "position",
            d_model=cfg.d_model, n_heads=cfg.n_heads, head_dim=cfg.head_dim, max_seq_len=cfg.max_seq_len,
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(self._block(i) for i in range(cfg.n_layers))
        final_norm = BLOCKS.get(cfg.block["name"]).final_norm
        self.norm = self._norm() if final_norm else nn.Identity()
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std, cfg.n_layers)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        # Found once, before any wrapper renames a module: a Protocol isinstance over every module
        # in every step cost ~7 ms of host time per step at 32 blocks (scripts/bench_host_overhead.py).
        # Plain lists (not registered as submodules), holding the same module objects that wrappers
        # (activation checkpointing, torch.compile, FSDP) later wrap or re-class in place.
        self._aux_providers = [(n, m) for n, m in self.named_modules() if m is not self and isinstance(m, AuxLossProvider)]
        self._metrics_providers = [m for m in self.modules() if m is not self and isinstance(m, MetricsProvider)]

    def _norm(self) -> nn.Module:
        return build(NORMS, self.cfg.norm, "norm", dim=self.cfg.d_model, bias=self.cfg.bias)

    def _block(self, layer: int) -> nn.Module:
        cfg = self.cfg
        attention = build(
            ATTENTION, cfg.attention, "attention",
            d_model=cfg.d_model, n_heads=cfg.n_heads, bias=cfg.bias, dropout=cfg.dropout,
        )
        ffn = build(FFNS, cfg.ffn, "ffn", d_model=cfg.d_model, bias=cfg.bias, dropout=cfg.dropout, layer=layer)
        return build(BLOCKS, cfg.block, "block", attention=attention, ffn=ffn, norm_1=self._norm(), norm_2=self._norm())

    def forward(self, idx: Tensor, positions: Tensor | None = None, segments: Tensor | None = None) -> Tensor:
        """idx: (B, T) token ids -> logits (B, T, V). positions: (T,) or (B, T), arange(T) unless
        given (generation passes later positions; see llmkit/generation). segments: (B, T) document
        index of each token when rows pack several documents, whose positions then restart at 0:
        a token attends only to earlier tokens of its own document."""
        return self.head(self._features(idx, positions, segments))

    # forward, features and logits_and_features each run the model once; under FSDP each is hooked to gather
    # the root's parameters (llmkit/distributed.py FORWARD_METHODS), so none calls another (a nested hook
    # would free them on its way out), all share _features
    def logits_and_features(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) ids -> (logits (B, T, V), final hidden states (B, T, C)) from one pass: a value head reads
        the states beside the policy's logits (llmkit/posttrain/rl_ppo.py)."""
        hidden = self._features(idx)
        return self.head(hidden), hidden

    def features(self, idx: Tensor, positions: Tensor | None = None, segments: Tensor | None = None) -> Tensor:
        """The final (normed) hidden states (B, T, C) that the head reads; a reward model's scalar
        head reads them too (llmkit/posttrain/objectives.py)."""
        return self._features(idx, positions, segments)

    def _features(self, idx: Tensor, positions: Tensor | None = None, segments: Tensor | None = None) -> Tensor:
        T = idx.size(1)
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        pos = torch.arange(T, device=idx.device) if positions is None else positions
        ctx = replace(self.position.context(pos, pos), q_seg=segments, k_seg=segments)
        x = self.dropout(self.position.embed(self.tok_emb(idx), pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x, ctx)
        return self.norm(x)

    def loss(
        self, idx: Tensor, targets: Tensor, positions: Tensor | None = None, segments: Tensor | None = None
    ) -> LossOutput:
        """Next-token cross-entropy (targets == -100 are ignored) plus any auxiliary losses;
        positions and segments as in forward."""
        logits = self(idx, positions, segments)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        aux = self.pop_aux_losses()
        return LossOutput(loss=ce + sum(aux.values()), ce=ce, logits=logits, aux=aux, metrics=self.pop_metrics())

    def pop_aux_losses(self) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        for name, module in self._aux_providers:
            for key, value in module.pop_aux_losses().items():
                losses[f"{name}.{key}"] = value
        return losses

    def pop_metrics(self) -> dict[str, Tensor]:
        metrics: dict[str, Tensor] = {}
        for module in self._metrics_providers:
            metrics.update(module.pop_metrics())
        return metrics

    def num_params(self) -> int:
        """Parameters, plus the weights a layer keeps as buffers and still multiplies by (`quantized_params`:
        QLoRA's frozen base Linears, llmkit/adapters/qlora.py), so FLOPs and MFU count the model they run."""
        stored = sum(m.quantized_params() for m in self.modules() if hasattr(m, "quantized_params"))
        return sum(p.numel() for p in self.parameters()) + stored

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 per weight used in a matmul (forward + backward) plus the
        attention scores and weighted sum, 12 * layers * d_model * keys (PaLM, appendix B), where
        keys is seq_len, or the window when that is shorter (llmkit/plan.py reports both)."""
        lookups = sum(p.numel() for p in self.position.parameters())
        if not self.cfg.tie_embeddings:
            lookups += self.tok_emb.weight.numel()
        inactive = sum(m.inactive_params() for m in self.modules() if hasattr(m, "inactive_params"))  # MoE experts
        matmul_params = self.num_params() - lookups - inactive
        window = self.cfg.attention.get("window")
        keys = min(seq_len, window) if window else seq_len
        return 6 * matmul_params + 12 * self.cfg.n_layers * self.cfg.d_model * keys

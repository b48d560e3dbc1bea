"""The model's configuration: plain, serialisable data. Components are named, not imported,
so checkpoints keep loading when modules move (see DESIGN.md, section 3)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.02
    # each component: {"name": <registry name>, **options of that component}
    block: dict[str, Any] = field(default_factory=lambda: {"name": "pre_ln"})
    norm: dict[str, Any] = field(default_factory=lambda: {"name": "layernorm"})
    attention: dict[str, Any] = field(default_factory=lambda: {"name": "causal"})
    position: dict[str, Any] = field(default_factory=lambda: {"name": "learned"})
    ffn: dict[str, Any] = field(default_factory=lambda: {"name": "mlp"})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Build from a (Hydra) mapping; keys that are not model fields (a preset's label) are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: _plain(v) for k, v in values.items() if k in known}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value

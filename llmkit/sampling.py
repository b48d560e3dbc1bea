"""The end-of-training sample (llmkit/train.py): a thin wrapper over llmkit.generation."""

from __future__ import annotations

import torch

from llmkit.generation import generate
from llmkit.model import Transformer


@torch.no_grad()
def sample(
    model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """prompt: (B, T) ids -> (B, T + max_new_tokens). temperature 0 is greedy. Decodes with the KV
    cache; without stop tokens every rank runs the same forwards, as a sharded (FSDP) model needs."""
    new = generate(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return torch.cat([prompt, torch.tensor(new, dtype=prompt.dtype, device=prompt.device)], dim=1)

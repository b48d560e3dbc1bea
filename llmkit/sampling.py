"""Autoregressive sampling by full recomputation (the KV-cache generator lives elsewhere)."""

from __future__ import annotations

import torch

from llmkit.model import Transformer


@torch.no_grad()
def sample(
    model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """prompt: (B, T) ids -> (B, T + max_new_tokens). temperature 0 is greedy."""
    was_training = model.training
    model.eval()
    ids = prompt
    for _ in range(max_new_tokens):
        logits = model(ids[:, -model.cfg.max_seq_len :])[:, -1, :].float()  # (B, V)
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, next_id], dim=1)
    model.train(was_training)
    return ids

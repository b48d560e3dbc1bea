"""Scoring preference pairs with a reward model trained by `task=reward` (`llmkit score`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmkit.posttrain.formats import read_jsonl
from llmkit.posttrain.objectives import RewardModel
from llmkit.posttrain.packing import pack
from llmkit.text.chat import render_chat, truncate


def load_reward_model(path: str | Path, device: str = "cpu") -> tuple[Any, RewardModel, Any, str]:
    """(model, reward objective with its trained head, tokenizer, chat template) of a reward checkpoint."""
    from llmkit.checkpoint import load_checkpoint

    loaded = load_checkpoint(path, map_location=device)
    head = loaded.checkpoint["state_dict"].get("objective.head.weight")
    if head is None:
        raise ValueError(f"{path} has no reward head: it was not trained with task=reward")
    reward = RewardModel()
    reward.attach(loaded.model, None, "full")
    with torch.no_grad():
        reward.head.weight.copy_(head)
    return loaded.model.eval(), reward.eval(), loaded.tokenizer, loaded.checkpoint.get("chat_template", "chatml")


@torch.no_grad()
def score_pairs(path: str | Path, pairs: str | Path, batch_size: int = 8, device: str = "cpu") -> dict[str, Any]:
    """Rewards of every pair's chosen and rejected reply, and how often the chosen one wins."""
    model, reward, tokenizer, template = load_reward_model(path, device)
    records = read_jsonl(pairs)
    if not records.is_preference:
        raise ValueError(f"{pairs} holds {records.format} records, not preference pairs (prompt, chosen, rejected)")
    context = model.cfg.max_seq_len
    sides = {}
    for side in ("chosen", "rejected"):
        rendered = [render_chat([*p.prompt, *getattr(p, side)], tokenizer, template, "last") for p in records.items]
        kept, counts = truncate(rendered, context)
        if counts["dropped_no_scored_tokens"]:
            raise ValueError(f"{pairs}: {counts['dropped_no_scored_tokens']} replies do not fit the context of {context}")
        rows = pack(kept, context, packing=False)
        ids, labels = torch.from_numpy(rows.ids).to(device), torch.from_numpy(rows.labels).to(device)
        sides[side] = torch.cat([reward.scores(model, ids[i : i + batch_size], labels[i : i + batch_size])
                                 for i in range(0, len(ids), batch_size)])
    chosen, rejected = sides["chosen"].tolist(), sides["rejected"].tolist()
    return {
        "pairs": len(chosen), "accuracy": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen),
        "mean_margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(chosen),
        "scores": [{"chosen": c, "rejected": r} for c, r in zip(chosen, rejected, strict=True)],
        "counts": records.counts,
    }

"""Post-training test data, generated here (no downloads), and a base model with room for it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


def longer_context(checkpoint: Path, out: Path, max_seq_len: int) -> Path:
    """A copy of a RoPE checkpoint with a longer context (RoPE has no position table to resize)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["model_config"]["max_seq_len"] = max_seq_len
    torch.save(state, out)
    return out


def parity_records(n: int, seed: int) -> list[dict[str, str]]:
    """prompt/completion pairs a small model can learn in tens of steps: 'even' or 'odd' of a number."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        number = rng.randrange(10, 10_000)
        records.append({"prompt": f"{number} is", "completion": " even" if number % 2 == 0 else " odd"})
    return records


def preference_records(n: int, seed: int) -> list[dict[str, str]]:
    """(prompt, chosen, rejected): the chosen reply is always ' yes', the rejected one ' no'."""
    rng = random.Random(seed)
    return [{"prompt": f"{rng.randrange(100, 999)} ok?", "chosen": " yes", "rejected": " no"} for _ in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path

"""Rewards for online RL, chosen by `reward=` (conf/reward/): each scores a batch of completions.

    function     reward.fn=package.module:function, called as TRL calls its reward functions:
                 fn(prompts=[str], completions=[str], completion_ids=[[int]], **fields) where every other
                 field of the records comes as a list (one value per completion); it returns one float
                 per completion, or None for one it cannot score (advantage 0, counted)
    exact_match  1 when the completion, stripped, equals the record's `field` (reward.field=answer)
    regex        1 when reward.pattern matches the completion (re.search); with reward.field, the first
                 group (or the whole match) must equal that field
    numeric      1 when the last number in the completion equals the record's `field` (to reward.tolerance)
    model        reward.ckpt=<a task=reward checkpoint>: its score of [prompt, completion] (refused when the
                 checkpoint has no reward head or another tokenizer than the policy's)

`score` checks what a reward returns: one finite float or None per completion, else it refuses with
the counts; a reward that raises is named with the first record of the batch.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llmkit.registry import Registry

REWARDS: Registry[Reward] = Registry("reward")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Completions:
    """N = prompts x num_generations rows, each with the fields of the record its prompt came from."""

    prompts: list[str]
    texts: list[str]
    ids: list[list[int]]
    records: list[dict[str, Any]]
    prompt_ids: list[list[int]] | None = None  # the rendered prompt of each row (a reward model reads both)


class Reward:
    name = "reward"

    def bind(self, tokenizer: Any, device: Any) -> None:
        """Called once the policy's tokenizer and device are known (the start of fit)."""

    def __call__(self, batch: Completions) -> list[float | None]:
        raise NotImplementedError


@REWARDS.register("function")
class FunctionReward(Reward):
    def __init__(self, fn: str | None = None) -> None:
        if not fn or ":" not in fn:
            raise ValueError(f"reward=function needs reward.fn=package.module:function (got {fn!r})")
        module, _, attr = fn.partition(":")
        try:
            self.fn: Callable[..., Sequence[Any]] = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"reward.fn={fn}: cannot import it ({error}); it must be importable from the run's "
                             "working directory or an installed package") from error
        self.name = fn

    def __call__(self, batch: Completions) -> list[float | None]:
        fields = {key: [r.get(key) for r in batch.records] for key in _keys(batch.records)}
        fields.pop("prompt", None)
        return list(self.fn(prompts=batch.prompts, completions=batch.texts, completion_ids=batch.ids, **fields))


@REWARDS.register("exact_match")
class ExactMatch(Reward):
    def __init__(self, field: str = "answer", strip: bool = True) -> None:
        self.field, self.strip, self.name = field, strip, f"exact_match:{field}"

    def __call__(self, batch: Completions) -> list[float | None]:
        out: list[float | None] = []
        for text, record in zip(batch.texts, batch.records, strict=True):
            want = _field(record, self.field)
            text = text.strip() if self.strip else text
            out.append(float(text == (str(want).strip() if self.strip else str(want))))
        return out


@REWARDS.register("regex")
class RegexMatch(Reward):
    def __init__(self, pattern: str | None = None, field: str | None = None) -> None:
        if not pattern:
            raise ValueError("reward=regex needs reward.pattern=<a Python regular expression>")
        self.pattern, self.field, self.name = re.compile(pattern), field, f"regex:{pattern}"

    def __call__(self, batch: Completions) -> list[float | None]:
        out: list[float | None] = []
        for text, record in zip(batch.texts, batch.records, strict=True):
            match = self.pattern.search(text)
            if match is None or self.field is None:
                out.append(float(match is not None))
                continue
            found = match.group(1) if match.groups() else match.group(0)
            out.append(float(found.strip() == str(_field(record, self.field)).strip()))
        return out


@REWARDS.register("numeric")
class NumericAnswer(Reward):
    def __init__(self, field: str = "answer", tolerance: float = 1e-6) -> None:
        self.field, self.tolerance, self.name = field, tolerance, f"numeric:{field}"

    def __call__(self, batch: Completions) -> list[float | None]:
        out: list[float | None] = []
        for text, record in zip(batch.texts, batch.records, strict=True):
            numbers = _NUMBER.findall(text.replace(",", ""))
            want = float(_field(record, self.field))
            out.append(float(bool(numbers) and abs(float(numbers[-1]) - want) <= self.tolerance))
        return out


@REWARDS.register("model")
class RewardModelScore(Reward):
    """The score of a `task=reward` checkpoint on [prompt, completion]: its scalar head on the final hidden
    state of the completion's last token (the end of turn when the completion stopped), as it was trained."""

    def __init__(self, ckpt: str | None = None, batch_size: int = 16) -> None:
        if not ckpt:
            raise ValueError("reward=model needs reward.ckpt=<a checkpoint trained with task=reward>")
        self.ckpt, self.batch_size, self.name = ckpt, batch_size, "model"
        self.model: Any = None
        self.head: Tensor | None = None

    def bind(self, tokenizer: Any, device: Any) -> None:
        from llmkit.checkpoint import load_checkpoint

        loaded = load_checkpoint(self.ckpt)
        task = (loaded.checkpoint.get("hyper_parameters", {}).get("task") or {}).get("name", "pretrain")
        head = loaded.checkpoint["state_dict"].get("objective.head.weight")
        if head is None:
            raise ValueError(f"reward.ckpt={self.ckpt} is not a reward model (it was trained with task={task}, and "
                             "holds no reward head): train one with task=reward on preference pairs")
        theirs = loaded.tokenizer
        if theirs is None or theirs.fingerprint != tokenizer.fingerprint:
            described = "no tokenizer" if theirs is None else f"tokenizer {theirs.kind} {theirs.fingerprint}"
            raise ValueError(f"reward.ckpt={self.ckpt} has {described}, the policy tokenizer {tokenizer.kind} "
                             f"{tokenizer.fingerprint}: a reward model must read the policy's token ids, so train it "
                             "from the same base (init_from=) as the policy")
        self.model = loaded.model.to(device).eval().requires_grad_(False)
        self.head = head.to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, batch: Completions) -> list[float | None]:
        if self.model is None or batch.prompt_ids is None:
            raise RuntimeError("reward=model scores [prompt, completion] ids: bind() it to the policy's tokenizer first")
        rows = [p + c for p, c in zip(batch.prompt_ids, batch.ids, strict=True)]
        device, out = self.head.device, []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long, device=device)  # right-padded
            for i, row in enumerate(chunk):
                ids[i, : len(row)] = torch.tensor(row, device=device)
            last = torch.tensor([len(r) - 1 for r in chunk], device=device)
            hidden = self.model.features(ids)[torch.arange(len(chunk), device=device), last]  # (b, C)
            out += (hidden.float() @ self.head.T).squeeze(-1).tolist()
        return out


def score(reward: Reward, batch: Completions) -> tuple[Tensor, int]:
    """(N,) float64 rewards, NaN where unscorable, and how many were unscorable; refuses wrong output."""
    n = len(batch.texts)
    try:
        values = reward(batch)
    except Exception as error:
        first = json.dumps(batch.records[0], default=str)[:300] if batch.records else "{}"
        raise RuntimeError(f"reward {reward.name} raised {type(error).__name__}: {error} (on a batch of {n} "
                           f"completions, its first record {first})") from error
    if len(values) != n:
        raise ValueError(f"reward {reward.name} returned {len(values)} values for {n} completions: it must return "
                         "one float (or None) per completion")
    bad = [i for i, v in enumerate(values) if v is not None and not _finite(v)]
    if bad:
        raise ValueError(f"reward {reward.name} returned {len(bad)} of {n} values that are not finite numbers "
                         f"(first: {values[bad[0]]!r} for completion {bad[0]}, record "
                         f"{json.dumps(batch.records[bad[0]], default=str)[:200]}); return None for unscorable ones")
    rewards = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)
    return rewards, sum(v is None for v in values)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _keys(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for record in records for key in record))


def _field(record: dict[str, Any], name: str) -> Any:
    if name not in record:
        raise KeyError(f"the record has no field '{name}' (it has: {', '.join(record)}); set reward.field=")
    return record[name]

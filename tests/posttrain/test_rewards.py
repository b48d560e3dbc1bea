"""Rewards for online RL: the built-ins on hand-made completions, a user function seeing every record field
(as TRL calls them), and bad rewards refused with what is wrong."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from llmkit.posttrain.rewards import REWARDS, Completions, score


def _batch(texts: list[str], records: list[dict]) -> Completions:
    return Completions(prompts=[r["prompt"] for r in records], texts=texts, ids=[[1, 2]] * len(texts), records=records)


RECORDS = [{"prompt": "2+2=", "answer": "4", "level": 1}, {"prompt": "3*3=", "answer": "9", "level": 2}]


@pytest.fixture
def user_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("my_rewards")
    module.seen = {}

    def length_bonus(prompts, completions, completion_ids, **fields):
        module.seen.update(prompts=prompts, completion_ids=completion_ids, **fields)
        return [None if c == "?" else float(len(c)) for c in completions]

    module.length_bonus = length_bonus
    module.raises = lambda prompts, completions, **kw: [1 / 0 for _ in completions]
    module.too_few = lambda prompts, completions, **kw: [1.0]
    module.nan = lambda prompts, completions, **kw: [math.nan, 1.0]
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    return module


def test_builtin_rewards() -> None:
    batch = _batch([" 4 ", "nine"], RECORDS)
    assert score(REWARDS.build("exact_match"), batch)[0].tolist() == [1.0, 0.0]
    assert score(REWARDS.build("numeric"), _batch(["it is 4.0", "3, 9 and 10"], RECORDS))[0].tolist() == [1.0, 0.0]
    regex = REWARDS.build("regex", pattern=r"answer: (\d+)", field="answer")
    assert score(regex, _batch(["answer: 4", "answer: 8"], RECORDS))[0].tolist() == [1.0, 0.0]
    assert score(REWARDS.build("regex", pattern=r"^\d"), _batch(["4", "x"], RECORDS))[0].tolist() == [1.0, 0.0]
    with pytest.raises(KeyError, match="no field 'solution'"):
        REWARDS.build("exact_match", field="solution")(batch)


def test_a_function_reward_sees_every_record_field_and_none_is_unscorable(user_module) -> None:
    reward = REWARDS.build("function", fn="my_rewards:length_bonus")
    rewards, unscorable = score(reward, _batch(["abc", "?"], RECORDS))
    assert rewards[0] == 3.0 and torch.isnan(rewards[1]) and unscorable == 1
    seen = user_module.seen
    assert seen["prompts"] == ["2+2=", "3*3="] and seen["answer"] == ["4", "9"] and seen["level"] == [1, 2]
    assert seen["completion_ids"] == [[1, 2], [1, 2]]


def test_bad_rewards_are_refused_with_what_is_wrong(user_module) -> None:
    batch = _batch(["a", "b"], RECORDS)
    with pytest.raises(RuntimeError, match=r"my_rewards:raises raised ZeroDivisionError.*2\+2="):
        score(REWARDS.build("function", fn="my_rewards:raises"), batch)
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        score(REWARDS.build("function", fn="my_rewards:too_few"), batch)
    with pytest.raises(ValueError, match="1 of 2 values that are not finite"):
        score(REWARDS.build("function", fn="my_rewards:nan"), batch)
    with pytest.raises(ValueError, match="package.module:function"):
        REWARDS.build("function", fn="my_rewards.length_bonus")
    with pytest.raises(ValueError, match="cannot import"):
        REWARDS.build("function", fn="my_rewards:missing")

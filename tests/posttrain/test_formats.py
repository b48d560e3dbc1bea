"""JSONL formats: each parsed to messages lists (detected or named), errors naming file, line and
field, malformed JSON, identical chosen/rejected pairs dropped, warned about and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmkit.posttrain.formats import Preference, detect_format, read_jsonl


def write(tmp_path: Path, *records: object, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


USER, REPLY = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
SYSTEM, NO = {"role": "system", "content": "s"}, {"role": "assistant", "content": "no"}
SHAREGPT = [("system", "s"), ("human", "hi"), ("gpt", "yo")]


@pytest.mark.parametrize(
    "fmt, record, conversation",
    [
        ("prompt_completion", {"prompt": "hi", "completion": "yo"}, [USER, REPLY]),
        ("alpaca", {"instruction": "hi", "input": "", "output": "yo"}, [USER, REPLY]),
        ("alpaca", {"instruction": "hi", "input": "ctx", "output": "yo"}, [{**USER, "input": "ctx"}, REPLY]),
        ("messages", {"messages": [SYSTEM, USER, REPLY]}, [SYSTEM, USER, REPLY]),
        ("sharegpt", {"conversations": [{"from": f, "value": v} for f, v in SHAREGPT]}, [SYSTEM, USER, REPLY]),
    ],
)
def test_sft_formats(tmp_path: Path, fmt: str, record: dict, conversation: list) -> None:
    path = write(tmp_path, record, "", record)  # a blank line is skipped
    for named in (None, fmt):  # detected from the first record's keys, or named
        records = read_jsonl(path, named)
        assert records.format == fmt and not records.is_preference
        assert records.items == [conversation, conversation]
        assert records.counts == {"records": 2, "kept": 2}


def test_preference_as_text_and_as_messages(tmp_path: Path) -> None:
    text = {"prompt": "hi", "chosen": "yo", "rejected": "no"}
    lists = {"prompt": [USER], "chosen": [USER, REPLY], "rejected": [NO]}  # chosen repeats the prompt: removed
    records = read_jsonl(write(tmp_path, text, lists))
    assert records.format == "preference" and records.is_preference
    expected = Preference([USER], [REPLY], [NO])
    assert records.items == [expected, expected]
    assert records.counts == {"records": 2, "identical_chosen_rejected": 0, "kept": 2}


def test_identical_chosen_and_rejected_are_dropped_warned_and_counted(tmp_path: Path) -> None:
    same = {"prompt": "hi", "chosen": "yo", "rejected": "yo"}
    same_as_lists = {"prompt": "hi", "chosen": "yo", "rejected": [REPLY]}  # equal once converted
    good = {"prompt": "hi", "chosen": "yo", "rejected": "no"}
    path = write(tmp_path, same, good, same_as_lists)
    with pytest.warns(UserWarning, match=r"dropped 2 of 3 preference pairs .*lines 1, 3"):
        records = read_jsonl(path)
    assert records.counts == {"records": 3, "identical_chosen_rejected": 2, "kept": 1}
    assert [p.rejected for p in records.items] == [[NO]]


@pytest.mark.parametrize(
    "fmt, bad, field",
    [
        ("alpaca", {"instruction": "hi"}, "output"),
        ("prompt_completion", {"prompt": "hi"}, "completion"),
        ("messages", {"messages": [USER, {"role": "assistant"}]}, "messages[1].content"),
        ("sharegpt", {"conversations": [{"value": "hi"}]}, "conversations[0].from"),
        ("preference", {"prompt": "hi", "chosen": "yo"}, "rejected"),
    ],
)
def test_missing_field_names_file_line_and_field(tmp_path: Path, fmt: str, bad: dict, field: str) -> None:
    good = {
        "alpaca": {"instruction": "a", "output": "b"}, "prompt_completion": {"prompt": "a", "completion": "b"},
        "messages": {"messages": [USER]}, "sharegpt": {"conversations": [{"from": "human", "value": "a"}]},
        "preference": {"prompt": "a", "chosen": "b", "rejected": "c"},
    }[fmt]
    path = write(tmp_path, good, good, bad, name="sft.jsonl")
    with pytest.raises(ValueError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}, line 3: missing field '{field}'")


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, {"prompt": "a", "completion": "b"}, '{"prompt": "a", "completion": }')
    with pytest.raises(ValueError, match=r"data\.jsonl, line 2: not valid JSON"):
        read_jsonl(path)


def test_wrong_types_and_roles_are_errors(tmp_path: Path) -> None:
    cases = [
        ({"prompt": 3, "completion": "b"}, "field 'prompt' is a int, expected str"),
        ({"messages": [{"role": "tool", "content": "x"}]}, r"messages\[0\].role is 'tool'"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\].from is 'bot'"),
        ([1, 2], "expected a JSON object"),
    ]
    for record, message in cases:
        with pytest.raises(ValueError, match=r"line 1: .*" + message):
            read_jsonl(write(tmp_path, record))


def test_detection_and_unknown_formats(tmp_path: Path) -> None:
    assert detect_format({"instruction": "a", "output": "b", "input": ""}) == "alpaca"
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c"}) == "preference"
    with pytest.raises(ValueError, match=r"line 1: cannot tell the format from the keys \['text'\]"):
        read_jsonl(write(tmp_path, {"text": "a"}))
    with pytest.raises(KeyError, match="alpaca, messages, preference, prompt_completion, sharegpt"):
        read_jsonl(write(tmp_path, {"text": "a"}), "dolly")
    with pytest.raises(ValueError, match="no records"):
        read_jsonl(write(tmp_path, ""))

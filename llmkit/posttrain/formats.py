"""SFT and preference data from JSONL files: every format becomes the same messages lists.

One record per line; blank lines are skipped. The format is named, or detected from the first
record's keys (in this order):

    preference         {"prompt", "chosen", "rejected"}: each text or a messages list
    messages           {"messages": [{"role", "content"}, ...]} (OpenAI chat format)
    sharegpt           {"conversations": [{"from": human | gpt | system, "value"}, ...]}
    alpaca             {"instruction", "input"?, "output"}
    prompt_completion  {"prompt", "completion"}

An SFT record becomes a conversation: [{"role": "system" | "user" | "assistant", "content": str}].
alpaca's "input" stays on the user message (key "input") so the alpaca template can give it its
own "### Input:" section; other templates append it to the instruction. A preference record
becomes `Preference(prompt, chosen, rejected)`, three messages lists: a text prompt is one user
message, a text reply one assistant message, and a chosen/rejected list that repeats the prompt
messages at its start has them removed.

Errors name the file and line: malformed JSON, a missing field (and which), a wrong type. A pair
whose chosen equals its rejected carries no preference (the DPO margin is 0 whatever the model
does): it is dropped, warned about, and counted in `Records.counts` for the run's summary.json.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.jsonl import read_records
from llmkit.registry import Registry

Message = dict[str, str]
Conversation = list[Message]
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Preference:
    prompt: Conversation
    chosen: Conversation
    rejected: Conversation
    margin: float = 0.0  # how much better chosen is (an optional `margin` field): the reward model's loss margin


Record = Conversation | Preference


class RecordError(ValueError):
    """A record that does not fit its format; the reader adds the file and line."""


# record (a parsed JSON object) -> a conversation or a preference
FORMATS: Registry[Record] = Registry("data format")
PREFERENCE_FORMATS = ("preference",)


def _field(record: dict[str, Any], name: str, kind: type | tuple[type, ...] = str, where: str = "") -> Any:
    if name not in record:
        raise RecordError(f"missing field '{where}{name}'")
    if not isinstance(record[name], kind):
        raise RecordError(f"field '{where}{name}' is a {type(record[name]).__name__}, expected {_names(kind)}")
    return record[name]


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def _message(item: Any, where: str) -> Message:
    if not isinstance(item, dict):
        raise RecordError(f"{where} is a {type(item).__name__}, expected an object with 'role' and 'content'")
    role = _field(item, "role", where=f"{where}.")
    if role not in ROLES:
        raise RecordError(f"{where}.role is '{role}', expected one of {', '.join(ROLES)}")
    return {"role": role, "content": _field(item, "content", where=f"{where}.")}


def _messages(items: list[Any], name: str) -> Conversation:
    return [_message(item, f"{name}[{i}]") for i, item in enumerate(items)]


@FORMATS.register("prompt_completion")
def prompt_completion(record: dict[str, Any]) -> Conversation:
    return [{"role": "user", "content": _field(record, "prompt")}, {"role": "assistant", "content": _field(record, "completion")}]


@FORMATS.register("alpaca")
def alpaca(record: dict[str, Any]) -> Conversation:
    user = {"role": "user", "content": _field(record, "instruction")}
    if record.get("input"):  # optional: absent or "" means no context
        user["input"] = _field(record, "input")
    return [user, {"role": "assistant", "content": _field(record, "output")}]


@FORMATS.register("messages")
def messages(record: dict[str, Any]) -> Conversation:
    return _messages(_field(record, "messages", list), "messages")


@FORMATS.register("sharegpt")
def sharegpt(record: dict[str, Any]) -> Conversation:
    turns = _field(record, "conversations", list)
    out = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(f"{where} is a {type(turn).__name__}, expected an object with 'from' and 'value'")
        speaker = _field(turn, "from", where=f"{where}.")
        if speaker not in SHAREGPT_ROLES:
            raise RecordError(f"{where}.from is '{speaker}', expected one of {', '.join(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[speaker], "content": _field(turn, "value", where=f"{where}.")})
    return out


@FORMATS.register("preference")
def preference(record: dict[str, Any]) -> Preference:
    prompt = _side(record, "prompt", "user")
    chosen, rejected = (_strip_prompt(_side(record, name, "assistant"), prompt) for name in ("chosen", "rejected"))
    margin = record.get("margin", 0.0)
    if not isinstance(margin, int | float) or isinstance(margin, bool):
        raise RecordError(f"field 'margin' must be a number, got {type(margin).__name__}")
    return Preference(prompt, chosen, rejected, float(margin))


def _side(record: dict[str, Any], name: str, role: str) -> Conversation:
    """A text (one message of `role`) or a messages list."""
    value = _field(record, name, (str, list))
    return [{"role": role, "content": value}] if isinstance(value, str) else _messages(value, name)


def _strip_prompt(reply: Conversation, prompt: Conversation) -> Conversation:
    # some datasets (e.g. UltraFeedback) repeat the prompt at the start of chosen and rejected
    return reply[len(prompt) :] if len(reply) > len(prompt) and reply[: len(prompt)] == prompt else reply


def detect_format(record: dict[str, Any]) -> str:
    keys = set(record)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    for key, name in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca")):
        if key in keys:
            return name
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    raise RecordError(f"cannot tell the format from the keys {sorted(keys)}; name one of {', '.join(FORMATS.names())}")


# ---- reading a file ------------------------------------------------------------------------------
@dataclass
class Records:
    """What a file held. items: conversations, or `Preference`s when `is_preference`. counts:
    records read, kept, and dropped as identical chosen/rejected pairs (for summary.json)."""

    path: Path
    format: str
    items: list[Any]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def is_preference(self) -> bool:
        return self.format in PREFERENCE_FORMATS


def _convert(
    path: Path, lines: list[tuple[int, dict[str, Any]]], convert: Callable[[dict[str, Any]], Record], fmt: str
) -> list[tuple[int, Record]]:
    items = []
    for number, record in lines:
        try:
            items.append((number, convert(record)))
        except RecordError as err:
            raise ValueError(f"{path}, line {number}: {err} (format '{fmt}')") from None
    return items


def read_jsonl(path: str | Path, format: str | None = None) -> Records:
    """Every record of a JSONL file, converted (see the module docstring). format: one of
    FORMATS.names(), or None to detect it from the first record."""
    path = Path(path)
    lines = read_records(path)
    if format is None:
        try:
            format = detect_format(lines[0][1])
        except RecordError as err:
            raise ValueError(f"{path}, line {lines[0][0]}: {err}") from None
    numbered = _convert(path, lines, FORMATS.get(format), format)
    counts = {"records": len(numbered)}
    if format in PREFERENCE_FORMATS:
        numbered, counts["identical_chosen_rejected"] = _drop_identical(path, numbered)
    counts["kept"] = len(numbered)
    return Records(path, format, [item for _, item in numbered], counts)


def _drop_identical(path: Path, numbered: list[tuple[int, Any]]) -> tuple[list[tuple[int, Any]], int]:
    same = [number for number, p in numbered if p.chosen == p.rejected]
    if same:
        shown = ", ".join(map(str, same[:5])) + (", ..." if len(same) > 5 else "")
        warnings.warn(
            f"{path}: dropped {len(same)} of {len(numbered)} preference pairs whose chosen equals rejected "
            f"(lines {shown}): they carry no preference", stacklevel=3,
        )
    return [(number, p) for number, p in numbered if p.chosen != p.rejected], len(same)

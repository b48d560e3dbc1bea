"""JSONL files of records (post-training data, RL prompts, benchmark tasks): one reader, one kind of error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_records(path: str | Path, error: type[Exception] = ValueError) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-blank line. A line that is not JSON or not an object, or a file with
    no records, raises `error` with a message that starts with `file, line N:`, as llmkit's other input errors do."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise error(f"{path}, line {number}: expected a JSON object, got a {type(record).__name__}")
            records.append((number, record))
    if not records:
        raise error(f"{path}, line 1: no records")
    return records

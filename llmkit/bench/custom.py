"""Your own tasks from a directory (`tasks_dir=`): JSONL files of documents, and YAML files that describe
a task and hold (`docs:`) or name (`data:`) its documents.

    my_quiz.jsonl     {"query": "2+2=", "choices": ["3", "4"], "gold": 1}          multiple choice
    my_math.jsonl     {"context": "Q: 2+2?\\nA:", "answer": "4"}                   generation (exact match)
    my_code.jsonl     {"prompt": "def f(x):\\n", "tests": "def check(f): ...", "entry_point": "f"}
    my_task.yaml      name: my_task, kind: generation, data: my_math.jsonl, stop: ["\\n"], regex: "(\\d+)"

A task's kind comes from its fields (or `kind:` in YAML). A malformed file is an error that names the
file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llmkit.bench.tasks import CodeDoc, GenDoc, MCDoc, Task
from llmkit.jsonl import read_records

KINDS = {  # kind: (required fields, primary metric)
    "multiple_choice": ({"query", "choices", "gold"}, "acc"),
    "generation": ({"context", "answer"}, "exact_match"),
    "code": ({"prompt", "tests", "entry_point"}, "pass@1"),
}
OPTIONS = {"delimiter", "stop", "regex", "max_new_tokens", "n_samples", "temperature", "k", "primary", "description"}


class TaskFileError(ValueError):
    """A task file that cannot be read: the message starts with file:line."""


def load_tasks_dir(directory: str | Path) -> dict[str, Task]:
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise TaskFileError(f"tasks_dir={directory} is not a directory")
    described = [p for ext in ("*.yaml", "*.yml") for p in sorted(directory.glob(ext))]
    pairs = [(path, _yaml_task(path)) for path in described]
    tasks = {t.name: t for _, t in pairs}
    referenced = {(p.parent / t.options["data"]).resolve() for p, t in pairs if "data" in t.options}
    for path in sorted(directory.glob("*.jsonl")):
        if path.resolve() not in referenced and path.stem not in tasks:
            tasks[path.stem] = _task(path.stem, read_records(path, TaskFileError), {}, path)
    return tasks


def _yaml_task(path: Path) -> Task:
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise TaskFileError(f"{path}, line {line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(spec, dict):
        raise TaskFileError(f"{path}, line 1: a task file is a mapping with name, kind, and docs or data")
    unknown = set(spec) - OPTIONS - {"name", "kind", "docs", "data"}
    if unknown:
        allowed = ", ".join(["name", "kind", "docs", "data", *sorted(OPTIONS)])
        raise TaskFileError(f"{path}, line 1: unknown keys {sorted(unknown)}; allowed: {allowed}")
    if ("docs" in spec) == ("data" in spec):
        raise TaskFileError(f"{path}, line 1: give the documents either inline (docs: [...]) "
                            "or as a JSONL file (data: file.jsonl)")
    if "data" in spec:
        records = read_records(path.parent / spec["data"], TaskFileError)
        source = path.parent / spec["data"]
    else:
        records = [(_doc_line(path, i), r) for i, r in enumerate(spec["docs"] or [])]
        source = path
    options = {k: v for k, v in spec.items() if k in OPTIONS or k == "data"}
    return _task(str(spec.get("name") or path.stem), records, options, source, spec.get("kind"))


def _doc_line(path: Path, index: int) -> int:
    """The line of the index-th `- ` item under docs: (good enough to point at a bad document)."""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("docs:")), 0)
    items = [i + 1 for i, line in enumerate(lines) if i > start and line.lstrip().startswith("- ")]
    return items[index] if index < len(items) else start + 1


def _task(name: str, records: list[tuple[int, dict]], options: dict[str, Any], path: Path, kind: str | None = None) -> Task:
    first_line, first = records[0]
    if kind is None:
        kind = next((k for k, (fields, _) in KINDS.items() if fields <= set(first)), None)
        if kind is None:
            raise TaskFileError(f"{path}, line {first_line}: cannot tell the task's kind from fields {sorted(first)}; "
                                + "; ".join(f"{k} needs {sorted(f)}" for k, (f, _) in KINDS.items()))
    if kind not in KINDS:
        raise TaskFileError(f"{path}, line 1: unknown kind '{kind}'; kinds: {', '.join(KINDS)}")
    fields, primary = KINDS[kind]
    docs = []
    for i, (line_no, record) in enumerate(records):
        missing = fields - set(record)
        if missing:
            raise TaskFileError(f"{path}, line {line_no}: a {kind} document needs {sorted(missing)} (has {sorted(record)})")
        try:
            docs.append(_doc(kind, i, record, options))
        except (TypeError, ValueError, IndexError) as err:
            raise TaskFileError(f"{path}, line {line_no}: {err}") from None
    return Task(name, kind, docs, primary=str(options.get("primary", primary)), options=options)


def _doc(kind: str, i: int, r: dict, options: dict[str, Any]) -> MCDoc | GenDoc | CodeDoc:
    if kind == "multiple_choice":
        choices, gold = [str(c) for c in r["choices"]], int(r["gold"])
        if not isinstance(r["choices"], list) or len(choices) < 2 or not 0 <= gold < len(choices):
            raise ValueError(f"choices must be a list of 2 or more and gold an index into it (gold={r['gold']})")
        return MCDoc(i, options.get("description", "") + str(r["query"]), choices, gold, str(options.get("delimiter", " ")))
    if kind == "generation":
        answers = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
        return GenDoc(i, options.get("description", "") + str(r["context"]), [str(a) for a in answers])
    return CodeDoc(i, str(r["prompt"]), str(r["tests"]), str(r["entry_point"]), r.get("canonical_solution"))

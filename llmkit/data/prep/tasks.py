"""Units of preparation work, and the body every task runs, whatever engine started it.

A stage is a list of units, each a picklable call identified by (stage, key); keys depend on the input and the
settings only, never on the number of tasks, so a rerun with any number of tasks finds the work already done. A unit
writes its outputs atomically (llmkit/data/files.py) and, last, its marker `.prep/done/<stage>/<key>.json` holding
its small JSON result: a unit with a marker is complete and is skipped; a unit without one is run again from the
start, overwriting whatever a killed attempt left. An error is recorded in `.prep/errors/<stage>/` for the driver to
report, with the input it names.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.data.files import write_json_atomic

PREP = ".prep"  # everything a build needs only while it runs: removed when the dataset is published


@dataclass(frozen=True)
class Unit:
    stage: str
    key: str
    fn: Callable[..., dict[str, Any]]  # a module-level function: it pickles by reference
    args: tuple = field(default=())

    def __call__(self) -> dict[str, Any]:
        return self.fn(*self.args)


class UnitError(RuntimeError):
    """A unit failed; the message says which and why."""


def marker(work: Path, stage: str, key: str) -> Path:
    return Path(work) / PREP / "done" / stage / f"{key}.json"


def error_file(work: Path, stage: str, key: str) -> Path:
    return Path(work) / PREP / "errors" / stage / f"{key}.txt"


def is_done(work: Path, unit: Unit) -> bool:
    return marker(work, unit.stage, unit.key).exists()


def result(work: Path, unit: Unit) -> dict[str, Any]:
    return json.loads(marker(work, unit.stage, unit.key).read_text(encoding="utf-8"))


def run_units(units: Sequence[Unit], work: str | Path) -> int:
    """Run the units not yet done, in order; the body of one task (in this process, or a submitit job).
    Returns how many it ran."""
    ran = 0
    for unit in units:
        if is_done(Path(work), unit):
            continue
        run_unit(unit, Path(work))
        ran += 1
    return ran


def run_unit(unit: Unit, work: Path) -> dict[str, Any]:
    try:
        outcome = unit()
    except Exception as err:
        path = error_file(work, unit.stage, unit.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{err}\n\n{traceback.format_exc()}", encoding="utf-8")
        raise
    path = marker(work, unit.stage, unit.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, outcome)  # last: the unit is complete
    return outcome


def recorded_errors(work: Path, stage: str) -> list[str]:
    """First lines of the errors units of `stage` recorded, by unit key."""
    folder = Path(work) / PREP / "errors" / stage
    messages = []
    for path in sorted(folder.rglob("*.txt")) if folder.exists() else []:
        key = path.relative_to(folder).with_suffix("").as_posix()
        messages.append(f"{stage} {key}: {path.read_text(encoding='utf-8').splitlines()[0]}")
    return messages

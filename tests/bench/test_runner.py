"""Generation and code tasks through the runner: exact match after a regex, pass@k of executed completions."""

from __future__ import annotations

import pytest

from llmkit.bench.execution import CodeExecutionRefused
from llmkit.bench.runner import extract, run_task
from llmkit.bench.tasks import CodeDoc, GenDoc, Task
from tests.bench.conftest import HUMANEVAL, char_model, char_tokenizer
from tests.bench.test_paired import trained_on_successor


def test_extract() -> None:
    assert extract(" The answer is 42.\n", r"answer is (\d+)") == "42"
    assert extract(" 17 apples", r"\d+") == "17"
    assert extract("nothing", r"(\d+)") == "" and extract("  plain \n", None) == "plain"


def test_generation_exact_match_with_stop_strings() -> None:
    model = trained_on_successor()  # continues a run of letters: "cdefg" -> "hij..."
    docs = [GenDoc(0, "cdefg", ["hij"]), GenDoc(1, "mnopq", ["rs"]), GenDoc(2, "uvwxy", ["zzz"])]
    result = run_task(model, char_tokenizer(), Task("next", "generation", docs, "exact_match",
                                                     {"max_new_tokens": 8, "stop": ["l", "t"], "regex": "^([a-z]{2,3})"}))
    records = result["samples"]
    assert [r["completion"] for r in records[:2]] == ["hijk", "rs"]  # cut at the stop strings "l" and "t"
    assert [r["exact_match"] for r in records] == [1.0, 1.0, 0.0]  # "zab" is not "zzz"
    assert result["metrics"]["exact_match"]["value"] == pytest.approx(2 / 3)


def test_code_task_refused_without_the_flag_and_scored_with_it() -> None:
    docs = [CodeDoc(i, p["prompt"], p["test"], p["entry_point"]) for i, p in enumerate(HUMANEVAL)]
    task = Task("code", "code", docs, "pass@1", {"max_new_tokens": 4})
    with pytest.raises(CodeExecutionRefused, match="allow_code_execution=true"):
        run_task(char_model(), char_tokenizer(), task)
    result = run_task(char_model(), char_tokenizer(), task, allow_code_execution=True, n_samples=2, k=(1, 2))
    assert result["n"] == 2 and set(result["metrics"]) == {"pass@1", "pass@2"}
    assert all(r["n"] == 2 and len(r["completions"]) == 2 for r in result["samples"])
    assert result["metrics"]["pass@1"]["value"] == 0.0  # four random characters never complete a function

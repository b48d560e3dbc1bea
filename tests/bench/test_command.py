"""`llmkit bench`: results file, -m comparison, compare= of two files, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmkit.cli import main as llmkit
from tests.bench.conftest import char_model, char_tokenizer, save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(char_model(), char_tokenizer(), tmp_path_factory.mktemp("bench_ckpt") / "model.ckpt")


def test_results_file(ckpt: Path, bench_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results.json"
    llmkit(["bench", f"ckpt={ckpt}", f"data_dir={bench_data}", "tasks=[mmlu,arc_easy,hellaswag]", f"out={out}",
            "log_samples=true", "batch_size=2"])
    results = json.loads(out.read_text())
    assert results["checkpoint"] == str(ckpt) and results["seed"] == 1234 and results["batch_size"] == 2
    assert results["step"] == 7 and results["model"]["d_model"] == 32 and "git_commit" in results
    mmlu = results["tasks"]["mmlu"]
    assert mmlu["n"] == 5 and mmlu["random_baseline"] == 0.25 and len(mmlu["samples"]) == 5
    acc = mmlu["metrics"]["acc"]
    p = acc["value"]
    assert acc["stderr"] == pytest.approx((p * (1 - p) / 4) ** 0.5)  # binomial, n - 1
    assert set(results["tasks"]["hellaswag"]["metrics"]) == {"acc", "acc_norm", "acc_per_token", "bpb"}
    assert results["composite"] is not None and "| mmlu | acc |" in capsys.readouterr().out


def test_multirun_compares_the_models(ckpt: Path, bench_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r.json"
    llmkit(["bench", "-m", f"ckpt={ckpt},{ckpt}", f"data_dir={bench_data}", "tasks=[arc_easy]", f"out={out}"])
    printed = capsys.readouterr().out
    assert "paired comparison" in printed and "within noise" in printed and "beyond" not in printed
    comparison = json.loads((tmp_path / "r.comparison.1.json").read_text())
    assert comparison["tasks"]["arc_easy"]["acc"]["verdict"] == "within noise"
    assert (tmp_path / "r.0.json").exists() and (tmp_path / "r.1.json").exists()


def test_compare_files_needs_samples(ckpt: Path, bench_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    llmkit(["bench", f"ckpt={ckpt}", f"data_dir={bench_data}", "tasks=[piqa]", f"out={a}"])
    with pytest.raises(SystemExit, match="log_samples=true"):
        llmkit(["bench", f"compare=[{a},{a}]"])
    llmkit(["bench", f"ckpt={ckpt}", f"data_dir={bench_data}", "tasks=[piqa]", f"out={b}", "log_samples=true"])
    llmkit(["bench", f"compare=[{b},{b}]"])
    assert "| piqa | acc |" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["tasks=[nope]"], "known tasks: arc_challenge"),
    (["tasks=[humaneval]"], "allow_code_execution=true"),
    (["tasks=[arc_easy]", "data_dir=/nonexistent"], "llmkit bench fetch=true"),
])
def test_refusals(ckpt: Path, bench_data: Path, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        llmkit(["bench", f"ckpt={ckpt}", f"data_dir={bench_data}", *args])


def test_hugging_face_and_int8_directories(bench_data: Path, tmp_path: Path) -> None:
    ckpt = save_checkpoint(char_model(position="learned"), char_tokenizer(), tmp_path / "gpt.ckpt")  # GPT-2 exports
    llmkit(["export", f"ckpt={ckpt}", f"out={tmp_path / 'hf'}"])
    llmkit(["quantize", f"ckpt={ckpt}", f"out={tmp_path / 'int8'}"])
    results = {}
    for name, path in (("ckpt", ckpt), ("hf", tmp_path / "hf"), ("int8", tmp_path / "int8")):
        out = tmp_path / f"{name}.json"
        llmkit(["bench", f"ckpt={path}", f"data_dir={bench_data}", "tasks=[hellaswag]", f"out={out}"])
        results[name] = json.loads(out.read_text())["tasks"]["hellaswag"]["metrics"]
    # the exported weights are the checkpoint's: the same bits per byte up to fp32 summation order
    assert results["hf"]["bpb"]["value"] == pytest.approx(results["ckpt"]["bpb"]["value"], rel=1e-5)
    assert results["int8"]["bpb"]["value"] == pytest.approx(results["ckpt"]["bpb"]["value"], rel=0.05)  # int8 weights

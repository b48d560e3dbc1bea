"""The `llmkit` command: its listing, every subcommand's Hydra app (help, composition, misspelt keys), packaging."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from llmkit.cli import SUBCOMMANDS
from llmkit.cli import main as llmkit

ROOT = Path(__file__).resolve().parents[1]
LLMKIT = str(Path(sys.executable).parent / "llmkit")  # the console script installed with the package

# a key each subcommand's config has, and a misspelling of it
KEYS = {
    "train": ("trainer.max_steps", "trainer.max_step=3"),
    "prepare": ("stage", "stag=clean"),
    "tokenizer": ("vocab_size", "vocab_sise=100"),
    "generate": ("max_new_tokens", "max_new_token=5"),
    "evaluate": ("stride", "strde=4"),
    "lm-eval": ("tasks", "task=hellaswag"),
    "bench": ("log_samples", "log_sample=true"),
    "export": ("ckpt", "chkpt=a.ckpt"),
    "import": ("hf", "hff=dir"),
    "consolidate": ("out", "outt=x.ckpt"),
    "report": ("wandb_project", "wandb_projet=p"),
    "score": ("pairs", "pair=x.jsonl"),
    "quantize": ("include_head", "include_heads=true"),
    "serve": ("max_batch", "max_batchs=4"),
    "plan": ("plan.mfu", "plan.mf=0.5"),
    "explore": ("top_k", "topk=3"),
}


def _console(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([LLMKIT, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_every_subcommand_has_a_key_under_test() -> None:
    assert set(KEYS) == set(SUBCOMMANDS)


@pytest.mark.parametrize("args", [[], ["--help"]], ids=["bare", "help"])
def test_llmkit_alone_lists_every_subcommand_with_one_line(args: list[str]) -> None:
    result = _console(*args)
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(SUBCOMMANDS)


def test_unknown_subcommand_fails_listing_the_valid_ones() -> None:
    result = _console("nosuch")
    assert result.returncode != 0
    assert "unknown subcommand 'nosuch'; valid subcommands: " + ", ".join(SUBCOMMANDS) in result.stderr


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_help_exits_0_and_names_the_keys(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        llmkit([name, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"llmkit {name}:"), out[:200]
    key = KEYS[name][0].split(".")[-1]
    assert f"{key}:" in out


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_config_composes(name: str) -> None:
    with initialize_config_module(config_module="llmkit.conf", version_base="1.3"):
        cfg = compose(SUBCOMMANDS[name].config)
    parent, _, leaf = KEYS[name][0].rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    assert leaf in OmegaConf.to_container(node)  # `in` on the DictConfig skips ??? values


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_misspelt_key_is_refused_naming_the_valid_ones(name: str, capsys: pytest.CaptureFixture) -> None:
    key, misspelt = KEYS[name]
    with pytest.raises(SystemExit) as stop:
        llmkit([name, misspelt])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    wrong = misspelt.split("=")[0]
    assert f"'{wrong}' is not a key of the {SUBCOMMANDS[name].config} config; did you mean {key}?" in err
    assert "valid keys" in err and key.split(".")[-1] in err.split("valid keys")[1]


def test_cfg_job_prints_the_composed_config_with_overrides(capsys: pytest.CaptureFixture) -> None:
    llmkit(["generate", "ckpt=a.ckpt", "max_new_tokens=7", "--cfg", "job"])
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.ckpt == "a.ckpt" and cfg.max_new_tokens == 7


def test_a_group_choice_that_is_not_a_key_gets_no_hint(capsys: pytest.CaptureFixture) -> None:
    # debug=fast chooses a group whose name is no key of the composed config: not a misspelling
    llmkit(["train", "debug=fast", "--cfg", "job"])
    assert "trainer:" in capsys.readouterr().out


def test_a_missing_required_value_says_how_to_give_it() -> None:
    with pytest.raises(SystemExit, match=r"give ckpt=\.\.\.: for example ckpt=outputs/<run>/checkpoints/last.ckpt"):
        llmkit(["export", "out=x"])


def test_pyproject_ships_every_package_and_the_configs() -> None:
    """A regular install holds only the packages pyproject lists: each llmkit/ package and conf/ as llmkit.conf."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "llmkit").rglob("__init__.py")}
    assert set(setuptools["packages"]) == found | {"llmkit.conf"}
    assert setuptools["package-dir"] == {"llmkit.conf": "conf"}
    assert (ROOT / "conf" / "__init__.py").exists()
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"] == {"llmkit": "llmkit.cli:main"}


@pytest.mark.slow
@pytest.mark.extended  # two console-script starts; evaluate -m and export run in-process in the default run
def test_evaluate_sweep_and_export_through_the_console_script(tiny_checkpoint: Path, tmp_path: Path) -> None:
    copies = [tmp_path / f"{name}.ckpt" for name in ("a", "b")]
    for copy in copies:
        copy.write_bytes(tiny_checkpoint.read_bytes())
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("def main():\n    return 1\n" * 8)
    result = _console("evaluate", "-m", f"ckpt={copies[0]},{copies[1]}", f"text={held_out}", "device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "multirun.yaml").exists()  # Hydra's sweep record goes to a temporary directory
    reports = [json.loads(Path(f"{copy}.eval.json").read_text()) for copy in copies]
    assert reports[0]["nll"] == reports[1]["nll"] > 0 and reports[0]["tokens"] > 10

    result = _console("export", f"ckpt={tiny_checkpoint}", f"out={tmp_path / 'hf'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_no_subcommand_key_is_also_a_config_group() -> None:
    """All configs share conf/, so `data=x` means the data group there: a key named like a group is unreachable."""
    groups = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")}
    for name, sub in SUBCOMMANDS.items():
        if name in ("train", "prepare", "plan"):  # these compose the groups themselves
            continue
        with initialize_config_module(config_module="llmkit.conf", version_base="1.3"):
            keys = set(OmegaConf.to_container(compose(sub.config)))
        assert not keys & groups, f"{sub.config}.yaml: {keys & groups} are config groups"

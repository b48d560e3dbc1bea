"""Ablation configs sweep real options and name their directories; loggers combine; wandb is offline without a key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llmkit import resolvers

CONF = Path(__file__).resolve().parents[2] / "conf"
ABLATIONS = sorted(p.stem for p in (CONF / "ablation").glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_the_issue_ablations_exist() -> None:
    assert {"attention", "position", "norm", "ffn", "lora_rank"} <= set(ABLATIONS)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_each_ablation_is_a_multirun_over_existing_options_with_seeds(ablation: str) -> None:
    cfg = _compose(f"ablation={ablation}", "experiment=shakespeare_char_cpu")
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = dict(cfg.hydra.sweeper.params)
    assert len(str(params.pop("seed")).split(",")) >= 2
    ((key, values),) = params.items()
    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
    assert "${seed}" in subdir and f"ablation-{ablation}" in cfg.hydra.sweep.dir
    if (CONF / key).is_dir():  # a config group: every option exists, and names the run directory
        for option in str(values).split(","):
            assert (CONF / key / f"{option}.yaml").exists(), f"{key}={option}"
        assert f"runtime.choices.{key}" in subdir
    else:  # a value (finetune.r): a key of the composed config, named in the run directory
        assert OmegaConf.select(cfg, key) is not None, key
        assert "${" + key + "}" in subdir


def test_several_loggers_at_once() -> None:
    cfg = _compose("logger=[csv,tensorboard,wandb]")
    assert list(cfg.logger) == ["csv", "tensorboard", "wandb"]
    assert _compose("logger=none").logger == {}


def test_wandb_is_offline_without_an_api_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolvers.wandb_offline()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not resolvers.wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolvers.wandb_offline()
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")
    assert not resolvers.wandb_offline()

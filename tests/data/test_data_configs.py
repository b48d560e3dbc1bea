"""Every conf/data option composes into a working LMDataModule (nothing is prepared here)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate

import llmkit  # noqa: F401  (config resolvers)
from llmkit.data import LMDataModule

CONF = Path(__file__).resolve().parents[2] / "conf"
POSTTRAIN = {"sft": "SFTDataModule", "preference": "PreferenceDataModule",  # llmkit/posttrain/data.py
             "prompts": "PromptDataModule"}  # llmkit/posttrain/prompts.py (online RL)
OPTIONS = sorted(p.stem for p in (CONF / "data").glob("*.yaml") if p.stem not in POSTTRAIN)
REQUIRED = {"text": ["data.path=corpus.txt"], "jsonl": ["data.path=docs.jsonl"], "hf": ["data.source_options.dataset=json"]}


@pytest.mark.parametrize("option", OPTIONS)
def test_data_option_composes_and_instantiates(option: str, tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={option}", f"paths.data_dir={tmp_path}", "paths.root_dir=.",
                                          *REQUIRED.get(option, [])])
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, LMDataModule)
    assert datamodule.spec.components and datamodule.data_dir().parent == tmp_path
    json.dumps(asdict(datamodule.spec))  # plain data, as the manifest stores it (no DictConfig inside)


@pytest.mark.parametrize("option", sorted(POSTTRAIN))
def test_post_training_data_composes_with_init_from_and_asks_for_it_without(option: str, tmp_path: Path) -> None:
    overrides = [f"data={option}", f"paths.data_dir={tmp_path}", "data.path=chat.jsonl"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "init_from=base.ckpt"])
        bare = compose("train", overrides=overrides)
    datamodule = instantiate(cfg.data)  # the base's tokenizer is read only when first needed
    assert type(datamodule).__name__ == POSTTRAIN[option] and datamodule.tokenizer_from == "base.ckpt"
    assert datamodule.cache_dir == tmp_path
    with pytest.raises(InstantiationException, match="give init_from="):
        instantiate(bare.data)


def test_every_option_is_covered() -> None:
    assert {"default", "text", "jsonl", "hf", "mixture", "shakespeare_char"} <= set(OPTIONS)

"""Every conf/data option composes into a working LMDataModule (nothing is prepared here)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import llmkit  # noqa: F401  (config resolvers)
from llmkit.data import LMDataModule

CONF = Path(__file__).resolve().parents[2] / "conf"
OPTIONS = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
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


def test_every_option_is_covered() -> None:
    assert {"default", "text", "jsonl", "hf", "mixture", "shakespeare_char"} <= set(OPTIONS)

"""llmkit prepare data=<config> [stage=...]: sources -> cleaning + splits -> tokenizer -> token shards + manifest."""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

import llmkit  # noqa: F401  (registers the config resolvers)
from llmkit.commands import CONFIG_PATH

STAGES = ("all", "clean", "tokenizer", "encode")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="prepare")
def main(cfg: DictConfig) -> None:
    if cfg.stage not in STAGES:
        raise SystemExit(f"unknown stage '{cfg.stage}'; valid: {', '.join(STAGES)}")
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    start = time.perf_counter()
    if cfg.stage == "all":
        datamodule.prepare_data()
        describe(datamodule.dataset, time.perf_counter() - start)
    else:
        work = run_stage(cfg.stage, datamodule, Path(cfg.work_dir) / datamodule.label)
        print(f"stage {cfg.stage} done in {time.perf_counter() - start:.1f} s: {work}")


def run_stage(stage: str, datamodule, work: Path) -> Path:
    from llmkit.data.pipeline import clean_stage, encode_stage, tokenizer_stage

    spec = datamodule.spec
    if stage == "clean":
        for name in sorted(spec.components):
            print(f"{name}: {clean_stage(spec, name, work, datamodule.progress)} documents per split")
    elif stage == "tokenizer":
        tokenizer = tokenizer_stage(spec, work)
        print(f"tokenizer: {tokenizer.kind}, {tokenizer.vocab_size} tokens, fingerprint {tokenizer.fingerprint}")
    else:
        encode_stage(spec, work, datamodule.encode_processes, datamodule.progress)
    return work


def describe(dataset, seconds: float) -> None:
    manifest = dataset.manifest
    print(f"dataset:   {dataset.directory}")
    print(f"tokenizer: {dataset.tokenizer.kind}, vocab {manifest['vocab_size']}, {manifest['dtype']} shards")
    for name, component in manifest["components"].items():
        cleaning = component.get("cleaning", {})
        removed = {k: v["removed"] for k, v in cleaning.get("filters", {}).items() if v["removed"]}
        print(f"{name} (weight {component['weight']}): {cleaning.get('documents_in')} documents in, "
              f"{cleaning.get('documents_out')} kept, removed {json.dumps(removed)}")
        for split, info in component["splits"].items():
            print(f"  {split:5s} {info['documents']:>9,} documents {info['tokens']:>13,} tokens {len(info['shards']):>5} shards")
    print(f"done in {seconds:.1f} s; `llmkit train` reuses it with the same data settings, or data.prepared={dataset.directory}")

"""Prepare a dataset: sources -> cleaning + splits -> tokenizer -> token shards + manifest.

  python scripts/prepare_data.py                                  # the default corpus (data=default)
  python scripts/prepare_data.py data=text data.path='books/*.txt' data.encode_processes=2
  python scripts/prepare_data.py data=jsonl data.path=dump.jsonl.gz stage=clean   # one stage alone

stage=all writes the dataset where train.py looks for it (data.cache_dir, keyed by the settings), so
`python train.py data=<same config>` reuses it; stage=clean|tokenizer|encode run one stage in work_dir
(each reads the previous stage's files there), for inspecting or re-running a stage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

import llmkit  # noqa: F401  (registers the config resolvers)
from llmkit.data.pipeline import clean_stage, encode_stage, tokenizer_stage
from llmkit.data.prepared import PreparedDataset

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("all", "clean", "tokenizer", "encode")


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="prepare_data")
def main(cfg: DictConfig) -> None:
    if cfg.stage not in STAGES:
        raise SystemExit(f"unknown stage '{cfg.stage}'; valid: {', '.join(STAGES)}")
    datamodule = instantiate(cfg.data)
    start = time.perf_counter()
    if cfg.stage == "all":
        datamodule.prepare_data()
        describe(datamodule.dataset, time.perf_counter() - start)
        return
    work = Path(cfg.work_dir) / datamodule.label
    spec = datamodule.spec
    if cfg.stage == "clean":
        for name in sorted(spec.components):
            print(f"{name}: {clean_stage(spec, name, work, datamodule.progress)} documents per split")
    elif cfg.stage == "tokenizer":
        tokenizer = tokenizer_stage(spec, work)
        print(f"tokenizer: {tokenizer.kind}, {tokenizer.vocab_size} tokens, fingerprint {tokenizer.fingerprint}")
    else:
        encode_stage(spec, work, datamodule.encode_processes, datamodule.progress)
    print(f"stage {cfg.stage} done in {time.perf_counter() - start:.1f} s: {work}")


def describe(dataset: PreparedDataset, seconds: float) -> None:
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
    print(f"done in {seconds:.1f} s; train.py reuses it with the same data settings, or data.prepared={dataset.directory}")


if __name__ == "__main__":
    main()

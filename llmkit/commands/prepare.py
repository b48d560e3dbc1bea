"""llmkit prepare data=<config> [stage=...] [executor=local|slurm tasks=N]: sources -> cleaning + dedup + splits ->
tokenizer -> token shards + manifest, in this process or as tasks on this machine or a SLURM cluster."""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import llmkit  # noqa: F401  (registers the config resolvers)
from llmkit.commands import CONFIG_PATH

STAGES = ("all", "clean", "tokenizer", "encode")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="prepare")
def main(cfg: DictConfig) -> None:
    if cfg.stage not in STAGES:
        raise SystemExit(f"unknown stage '{cfg.stage}'; valid: {', '.join(STAGES)}")
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    executor = make_executor(cfg, datamodule.progress)
    start = time.perf_counter()
    if cfg.stage == "all":
        describe(prepare_all(datamodule, executor, cfg.piece_mb), time.perf_counter() - start)
    else:
        work = run_stage(cfg.stage, datamodule, Path(cfg.work_dir) / datamodule.label, executor, cfg.piece_mb)
        print(f"stage {cfg.stage} done in {time.perf_counter() - start:.1f} s: {work}")


def make_executor(cfg: DictConfig, progress: bool):
    from llmkit.data.prep.executors import make_executor as build

    slurm = OmegaConf.to_container(cfg.slurm, resolve=True) if cfg.slurm is not None else {}
    return build(cfg.executor, cfg.tasks, cfg.retries, cfg.timeout_min, slurm, progress)


def prepare_all(datamodule, executor, piece_mb: float):
    """The dataset where `llmkit train` looks for it (data.cache_dir), prepared on `executor`."""
    if datamodule.prepared is not None or executor.name == "none":
        datamodule.prepare_data()  # the path train takes: nothing to prepare, or in this process
        return datamodule.dataset
    from llmkit.data.prep.pipeline import prepare
    from llmkit.data.prepared import PreparedDataset

    out = prepare(datamodule.spec, datamodule.cache_dir, datamodule.label, datamodule.encode_processes,
                  datamodule.progress, out=datamodule.data_dir(), executor=executor, piece_bytes=_bytes(piece_mb))
    return PreparedDataset.open(out, datamodule.verify)


def run_stage(stage: str, datamodule, work: Path, executor=None, piece_mb: float = 64) -> Path:
    from llmkit.data.prep.pipeline import clean_components, encode_stage, tokenizer_stage

    spec = datamodule.spec
    if stage == "clean":
        for name, counts in clean_components(spec, work, executor, piece_bytes=_bytes(piece_mb)).items():
            print(f"{name}: {counts} documents per split")
    elif stage == "tokenizer":
        tokenizer = tokenizer_stage(spec, work, executor)
        print(f"tokenizer: {tokenizer.kind}, {tokenizer.vocab_size} tokens, fingerprint {tokenizer.fingerprint}")
    else:
        encode_stage(spec, work, datamodule.encode_processes, datamodule.progress, executor)
    return work


def _bytes(megabytes: float) -> int:
    return int(megabytes * (1 << 20))


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

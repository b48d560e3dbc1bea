"""llmkit bench ckpt=... tasks=[...]: offline benchmarks; -m ckpt=a,b or compare=[a.json,b.json]: paired tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from llmkit.commands import CONFIG_PATH, as_list, pick_device

_SWEEP: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # multirun sweep dir -> (ckpt, results) of each job so far


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="bench")
def main(cfg: DictConfig) -> None:
    if cfg.fetch:
        from llmkit.bench.data import fetch

        print(f"benchmark data in {fetch(cfg.data_dir, cfg.wheels_dir)}")
        if not cfg.ckpt:
            return
    if cfg.compare:
        return _compare_files([str(p) for p in as_list(cfg.compare)], cfg.alpha)
    if not cfg.ckpt:
        raise SystemExit("give ckpt=<llmkit checkpoint | int8 directory | Hugging Face directory> "
                         "(or fetch=true, or compare=[a.json,b.json])")
    results = _run(cfg)
    from llmkit.bench.results import table, write

    print("\n".join(table(results)))
    out = write(results, _out_path(cfg), cfg.log_samples)
    print(f"results written to {out}")
    _compare_sweep(cfg, results, out)


def _run(cfg: DictConfig) -> dict[str, Any]:
    from llmkit.bench.data import MissingData
    from llmkit.bench.execution import CodeExecutionRefused
    from llmkit.bench.results import with_metadata
    from llmkit.bench.runner import evaluate, load_tasks

    try:
        names = [str(t) for t in as_list(cfg.tasks)]
        tasks = load_tasks(names, cfg.data_dir, cfg.tasks_dir, cfg.num_fewshot, cfg.seed, cfg.limit)
    except (KeyError, MissingData, ValueError) as err:
        raise SystemExit(f"llmkit bench: {err.args[0] if isinstance(err, KeyError) else err}") from None
    model, tokenizer, step = load_model(str(cfg.ckpt), pick_device(cfg.device), cfg.quantize)
    options = {"batch_size": cfg.batch_size, "allow_code_execution": cfg.allow_code_execution, "n_samples": cfg.n_samples,
               "k": tuple(as_list(cfg.k)), "temperature": cfg.temperature, "seed": cfg.seed, "timeout": cfg.timeout}
    try:
        results = evaluate(model, tokenizer, tasks, **options)
    except CodeExecutionRefused as err:
        raise SystemExit(f"llmkit bench: {err}") from None
    return with_metadata(results, checkpoint=str(cfg.ckpt), step=step, model=model.cfg.to_dict(), params=model.num_params(),
                         seed=cfg.seed, batch_size=cfg.batch_size, limit=cfg.limit, num_fewshot=cfg.num_fewshot)


def load_model(path: str, device: str, quantize: str | None = None) -> tuple[Any, Any, int]:
    """(model, tokenizer, step) from a llmkit checkpoint, an int8 directory or a Hugging Face directory."""
    from llmkit import quantize as int8
    from llmkit.checkpoint import load_for_inference

    if not Path(path).exists():
        raise SystemExit(f"llmkit bench: ckpt={path} does not exist")
    if Path(path).is_dir() and not int8.is_quantized_dir(path):
        from llmkit.hf import import_hf

        model, tokenizer = import_hf(path)
        step = 0
    else:
        loaded = load_for_inference(path, device, quantize)
        model, tokenizer, step = loaded.model, loaded.tokenizer, loaded.step
    if tokenizer is None:
        raise SystemExit(f"llmkit bench: {path} has no tokenizer; benchmark questions are text")
    return model.to(device).eval(), tokenizer, step


def _out_path(cfg: DictConfig) -> Path:
    out = Path(cfg.out)
    job = _job()
    return out.with_name(f"{out.stem}.{job[1]}{out.suffix}") if job else out


def _job() -> tuple[str, int] | None:
    """(sweep dir, job number) under -m, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    return (str(hc.sweep.dir), int(hc.job.num)) if hc.mode == RunMode.MULTIRUN else None


def _compare_sweep(cfg: DictConfig, results: dict[str, Any], out: Path) -> None:
    """Under -m, each job after the first is compared with the first, question by question."""
    job = _job()
    if job is None:
        return
    runs = _SWEEP.setdefault(job[0], [])
    runs.append((str(cfg.ckpt), results))
    if len(runs) > 1:
        (name_a, a), (name_b, b) = runs[0], runs[-1]
        _print_comparison(a, b, name_a, name_b, cfg.alpha, out.with_name(f"{Path(cfg.out).stem}.comparison.{job[1]}.json"))


def _compare_files(paths: list[str], alpha: float) -> None:
    from llmkit.bench.results import read

    if len(paths) != 2:
        raise SystemExit(f"compare= takes two results files, got {len(paths)}")
    a, b = (read(p) for p in paths)
    for path, r in zip(paths, (a, b), strict=True):
        if any("samples" not in t for t in r["tasks"].values()):
            raise SystemExit(f"{path} has no per-question records: write it with log_samples=true")
    _print_comparison(a, b, paths[0], paths[1], alpha, None)


def _print_comparison(a: dict, b: dict, name_a: str, name_b: str, alpha: float, out: Path | None) -> None:
    from llmkit.bench.paired import compare, comparison_lines

    comparison = compare(a, b, alpha)
    print(f"\npaired comparison, A = {name_a}, B = {name_b} (alpha={alpha}):")
    print("\n".join(comparison_lines(comparison, "A", "B")))
    if out is not None:
        out.write_text(json.dumps({"a": name_a, "b": name_b, "alpha": alpha, "tasks": comparison}, indent=2) + "\n")
        print(f"comparison written to {out}")



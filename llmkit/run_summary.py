"""What a run leaves behind: summary.json (completed or failed), the run's metadata in every
logger, and the end of a wandb run inside a multirun."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from llmkit.lit.callbacks import ThroughputMonitor
from llmkit.lit.downstream import last_values
from llmkit.lit.module import LitLM
from llmkit.provenance import git_commit

log = logging.getLogger(__name__)


def failed_summary(cfg: DictConfig, error: BaseException) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "status": "failed", "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(),
        "choices": choices(), "git_commit": git_commit(),
    }
    try:
        summary["config"] = OmegaConf.to_container(cfg, resolve=True)
        out = Path(cfg.paths.output_dir)
        if int(os.environ.get("RANK", "0")) == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            summary["summary_path"] = str(out / "summary.json")
    except Exception as inner:  # a config that does not even resolve: the error above says why
        log.warning(f"could not write the failed run's summary: {inner}")
    return summary


def finish_wandb(failed: bool) -> None:
    """A multirun runs its jobs in one process: each job's wandb run must end before the next starts."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)


def log_run_info(trainer: L.Trainer, summary: dict[str, Any]) -> None:
    """Every logger gets the resolved config, the git commit and the parameter count (wandb: its run config)."""
    info = {**summary["config"], "git_commit": summary["git_commit"], "params": summary["params"], "choices": summary["choices"]}
    for logger in trainer.loggers:
        logger.log_hyperparams(info)
        logger.save()
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:  # a readable copy in the run's files
            OmegaConf.save(OmegaConf.create(info), Path(logger.experiment.dir) / "llmkit_config.yaml")


def run_summary(cfg: DictConfig, trainer: L.Trainer, lit: LitLM, wall_s: float) -> dict[str, Any]:
    throughput = _find(trainer, ThroughputMonitor)
    checkpoint = trainer.checkpoint_callback
    val_loss = trainer.callback_metrics.get("val/loss")
    best = checkpoint.best_model_score if checkpoint is not None else None
    dm = trainer.datamodule
    tokens_per_step = dm.batch_size * dm.seq_len * trainer.accumulate_grad_batches * trainer.world_size
    perf = throughput.summary(tokens_per_step, trainer.world_size) if throughput else {}
    return {
        "status": "completed",
        "final_val_loss": _float(val_loss),
        "final_val_ppl": _float(val_loss.exp()) if val_loss is not None else None,
        "best_val_loss": _float(best),
        "steps": trainer.global_step,
        "tokens_seen": throughput.tokens_seen if throughput else None,
        **perf,
        "first_step_unix_time": throughput.first_step_unix_time if throughput else None,
        "params": lit.model.num_params(),
        "data": _data_summary(dm),
        "wall_time_s": wall_s,
        "peak_memory_bytes": _peak_memory(),
        "checkpoint": (checkpoint.best_model_path or checkpoint.last_model_path) if checkpoint else None,
        "last_checkpoint": checkpoint.last_model_path if checkpoint else None,
        **last_values(trainer),  # eval/<task>/<metric> of callbacks=downstream's last evaluation
        "choices": choices(),
        "git_commit": git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _data_summary(datamodule: L.LightningDataModule) -> dict[str, Any] | None:
    """Which prepared dataset the run read, so reports can tell runs on different data apart."""
    if hasattr(datamodule, "summary"):  # post-training data: its counts (truncated, dropped, identical pairs)
        return datamodule.summary()
    dataset = getattr(datamodule, "dataset", None)
    if dataset is None:
        return None
    return {
        "dataset": str(dataset.directory), "fingerprint": dataset.fingerprint,
        "tokenizer_fingerprint": dataset.tokenizer.fingerprint, "vocab_size": dataset.tokenizer.vocab_size,
        "tokens": {split: dataset.tokens(split) for split in ("train", "val", "test")},
        "samples_consumed": datamodule.samples_consumed(),
    }


def _peak_memory() -> int:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _find(trainer: L.Trainer, kind: type) -> Any:
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def choices() -> dict[str, str]:
    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra") and v is not None}

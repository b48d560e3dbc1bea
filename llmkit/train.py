"""run(cfg): check the hardware, instantiate data, model, trainer; fit; summarise; sample."""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from llmkit.distributed import process_group_scope, use_hydra_rank_command
from llmkit.hardware import check_hardware, set_matmul_precision
from llmkit.lit.callbacks import ThroughputMonitor
from llmkit.lit.checkpointing import AtomicCheckpointIO, find_resume_checkpoint
from llmkit.lit.module import LitLM
from llmkit.sampling import sample

log = logging.getLogger(__name__)

# keys of the trainer group that are llmkit's, not lightning.Trainer's
_NOT_TRAINER_ARGS = ("peak_flops_per_device", "float32_matmul_precision")


def run(cfg: DictConfig) -> dict[str, Any]:
    """One run. Inside a multirun a failing point writes summary.json with status "failed" and the sweep goes on."""
    failed = False
    try:
        with process_group_scope():  # a multirun's next job starts clean
            return _run(cfg)
    except Exception as error:
        failed = True
        summary = _failed_summary(cfg, error)
        if not _multirun():
            raise
        log.error(f"this sweep point failed; the sweep goes on ({summary.get('summary_path')}):\n{summary['traceback']}")
        return summary
    finally:
        _finish_wandb(failed)


def _multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _failed_summary(cfg: DictConfig, error: BaseException) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "status": "failed", "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(),
        "choices": _choices(), "git_commit": _git_commit(),
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


def _finish_wandb(failed: bool) -> None:
    """A multirun runs its jobs in one process: each job's wandb run must end before the next starts."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _log_run_info(trainer: L.Trainer, summary: dict[str, Any]) -> None:
    """Every logger gets the resolved config, the git commit and the parameter count (wandb: its run config)."""
    info = {**summary["config"], "git_commit": summary["git_commit"], "params": summary["params"], "choices": summary["choices"]}
    for logger in trainer.loggers:
        logger.log_hyperparams(info)
        logger.save()
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:  # a readable copy in the run's files
            OmegaConf.save(OmegaConf.create(info), Path(logger.experiment.dir) / "llmkit_config.yaml")


def _run(cfg: DictConfig) -> dict[str, Any]:
    started = time.perf_counter()
    check_hardware(cfg.trainer, _choice("trainer"))
    set_matmul_precision(cfg.trainer)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    lit = LitLM(
        model=_plain(cfg.model), optim=_plain(cfg.optim), scheduler=_plain(cfg.scheduler), compile=cfg.compile,
        activation_checkpointing=cfg.activation_checkpointing,
    )
    use_hydra_rank_command()  # DDP ranks start as single runs of this job, also inside a multirun
    trainer = _trainer(cfg)
    trainer.fit(lit, datamodule=datamodule, ckpt_path=_resume_path(cfg))
    summary = _summary(cfg, trainer, lit, time.perf_counter() - started)
    _log_run_info(trainer, summary)
    text = _sample(cfg, lit, datamodule)  # every rank: a sharded model's forward is collective
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print("\n---- sample " + "-" * 60 + f"\n{text}\n" + "-" * 72)
        print(f"run directory: {out}\ncheckpoint:    {summary['checkpoint']}\nsummary:       {out / 'summary.json'}")
    return summary


def _trainer(cfg: DictConfig) -> L.Trainer:
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it was told not to draw
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = [instantiate(c) for c in cfg.logger.values()] or False
    trainer_cfg = {k: v for k, v in _plain(cfg.trainer).items() if k not in _NOT_TRAINER_ARGS}
    plugins: list[Any] = []
    if SLURMEnvironment.detect():  # llmkit's PreemptionCheckpoint requeues, at a step boundary
        plugins.append(SLURMEnvironment(auto_requeue=False))
    if not _sharded(trainer_cfg):  # sharded checkpoints are written by the strategy itself
        plugins.append(AtomicCheckpointIO())
    return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers, plugins=plugins)


def _sharded(trainer_cfg: dict[str, Any]) -> bool:
    strategy = trainer_cfg.get("strategy")
    return isinstance(strategy, dict) and "ModelParallel" in str(strategy.get("_target_", ""))


def _resume_path(cfg: DictConfig) -> str | None:
    """ckpt_path=... wins; resume=auto takes the newest complete checkpoint of this run directory."""
    if cfg.ckpt_path is not None or cfg.get("resume") is None:
        return cfg.ckpt_path
    if cfg.resume != "auto":
        raise ValueError(f"resume={cfg.resume}: valid values are auto and null (or give ckpt_path=...)")
    found = find_resume_checkpoint(cfg.paths.output_dir)
    log.info(f"resume=auto: {'resuming from ' + str(found) if found else 'no checkpoint yet, starting fresh'}")
    return str(found) if found else None


def _summary(cfg: DictConfig, trainer: L.Trainer, lit: LitLM, wall_s: float) -> dict[str, Any]:
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
        "choices": _choices(),
        "git_commit": _git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _sample(cfg: DictConfig, lit: LitLM, datamodule: L.LightningDataModule) -> str:
    tokenizer = datamodule.tokenizer
    prompt_ids = tokenizer.encode(cfg.sample.prompt) or [tokenizer.eos_id or 0]
    prompt = torch.tensor([prompt_ids], device=lit.device)
    generator = torch.Generator(device=lit.device).manual_seed(cfg.seed)
    ids = sample(lit.model, prompt, cfg.sample.max_new_tokens, cfg.sample.temperature, cfg.sample.top_k, generator)
    return tokenizer.decode(ids[0].tolist())


def _data_summary(datamodule: L.LightningDataModule) -> dict[str, Any] | None:
    """Which prepared dataset the run read, so reports can tell runs on different data apart."""
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


def _plain(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)


def _choices() -> dict[str, str]:
    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra") and v is not None}


def _choice(group: str) -> str:
    return _choices().get(group, group)

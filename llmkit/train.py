"""run(cfg): check the hardware, instantiate data, model, trainer; fit; summarise; sample."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from llmkit.checkpoint_files import find_resume_checkpoint
from llmkit.distributed import choose_rendezvous_port, process_group_scope, stop_child_ranks, use_hydra_rank_command
from llmkit.hardware import check_hardware, set_matmul_precision
from llmkit.lit.checkpointing import AtomicCheckpointIO
from llmkit.lit.module import LitLM
from llmkit.plan import preflight
from llmkit.run_summary import choices, failed_summary, finish_wandb, log_run_info, run_summary
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
        summary = failed_summary(cfg, error)
        if not _multirun():
            raise
        log.error(f"this sweep point failed; the sweep goes on ({summary.get('summary_path')}):\n{summary['traceback']}")
        return summary
    finally:
        finish_wandb(failed)


def _multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _run(cfg: DictConfig) -> dict[str, Any]:
    started = time.perf_counter()
    check_hardware(cfg.trainer, _choice("trainer"))
    preflight(cfg)  # the memory estimate (llmkit/plan.py): stops before any data or model is made
    set_matmul_precision(cfg.trainer)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    lit = LitLM(
        model=_plain(cfg.model), optim=_plain(cfg.optim), scheduler=_plain(cfg.scheduler), compile=cfg.compile,
        activation_checkpointing=cfg.activation_checkpointing, task=_plain(cfg.task), finetune=_plain(cfg.finetune),
        init_from=cfg.get("init_from"),
    )
    use_hydra_rank_command()  # DDP ranks start as single runs of this job, also inside a multirun
    trainer = _trainer(cfg)
    choose_rendezvous_port(trainer)
    try:
        trainer.fit(lit, datamodule=datamodule, ckpt_path=_resume_path(cfg))
    except BaseException:
        stop_child_ranks(trainer)
        raise
    summary = run_summary(cfg, trainer, lit, time.perf_counter() - started)
    log_run_info(trainer, summary)
    out = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:  # before sampling, so a failing sample keeps the run's figures
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = _sample(cfg, lit, datamodule, trainer.strategy.root_device)  # every rank: a sharded forward is collective
    if trainer.is_global_zero:
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


def _sample(cfg: DictConfig, lit: LitLM, datamodule: L.LightningDataModule, device: torch.device) -> str:
    # Lightning's single-device and DDP teardown moved the model to the CPU: sample where it trained
    # (CUDA-only kernels, compiled blocks and a large model's speed all depend on it)
    lit.to(device)
    tokenizer = datamodule.tokenizer
    prompt_ids = tokenizer.encode(cfg.sample.prompt) or [tokenizer.eos_id or 0]
    prompt = torch.tensor([prompt_ids], device=lit.device)
    generator = torch.Generator(device=lit.device).manual_seed(cfg.seed)
    ids = sample(lit.model, prompt, cfg.sample.max_new_tokens, cfg.sample.temperature, cfg.sample.top_k, generator)
    return tokenizer.decode(ids[0].tolist())


def _plain(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)


def _choice(group: str) -> str:
    return choices().get(group, group)

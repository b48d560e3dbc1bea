"""OmegaConf resolvers used by conf/: registered when llmkit is imported."""

import math
import netrc
import os
from pathlib import Path

from omegaconf import OmegaConf

# ${mul:${trainer.devices},${trainer.num_nodes}}: FSDP's data-parallel size follows the allocation
OmegaConf.register_new_resolver("mul", lambda *factors: math.prod(int(f) for f in factors), replace=True)
# ${gpus_per_node:${trainer.accelerator},${trainer.devices}}: GPUs to request from SLURM (null on CPU)
OmegaConf.register_new_resolver(
    "gpus_per_node", lambda accelerator, devices: int(devices) if accelerator in ("gpu", "cuda") else None, replace=True
)


def _output_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_group() -> str | None:
    """A multirun's sweep directory (relative to the working directory when inside it); None for a single run."""
    out = _output_dir()
    if out is None or not _multirun():
        return None
    try:
        return str(out.parent.relative_to(Path.cwd()))
    except ValueError:
        return out.parent.name


def run_name() -> str | None:
    """The run directory's name: a sweep's subdir, which names the swept choices (conf/ablation/)."""
    out = _output_dir()
    return out.name if out is not None else None


def wandb_offline() -> bool:
    """Offline unless WANDB_MODE=online, or an API key is configured and WANDB_MODE does not say offline."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode == "online":
        return False
    if mode in ("offline", "dryrun", "disabled"):
        return True
    return not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb_key())


def _netrc_has_wandb_key() -> bool:
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


# conf/logger/wandb.yaml: ${llmkit_sweep_group:}, ${llmkit_run_name:}, ${llmkit_wandb_offline:}
OmegaConf.register_new_resolver("llmkit_sweep_group", sweep_group, replace=True)
OmegaConf.register_new_resolver("llmkit_run_name", run_name, replace=True)
OmegaConf.register_new_resolver("llmkit_wandb_offline", wandb_offline, replace=True)

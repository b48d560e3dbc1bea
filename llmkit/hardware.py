"""Pre-flight: a trainer config the machine cannot serve stops before any work, saying why."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class HardwareError(RuntimeError):
    pass


def check_hardware(trainer: Mapping[str, Any], name: str = "trainer") -> None:
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in ("gpu", "cuda"):
        return
    devices = trainer.get("devices", 1)
    wanted = devices if isinstance(devices, int) else len(devices) if isinstance(devices, (list, tuple)) else 1
    available = torch.cuda.device_count()
    if available >= wanted:
        return
    nodes = trainer.get("num_nodes", 1)
    where = f"{wanted} CUDA GPU(s) per node" + (f" on {nodes} nodes" if nodes > 1 else "")
    instead = "trainer=cpu" if available == 0 else f"trainer=gpu trainer.devices={available}"
    raise HardwareError(
        f"trainer={name} needs {where}, but this machine has {available}. "
        f"Run it where those GPUs are (see slurm/ for clusters), or run here with {instead}."
    )

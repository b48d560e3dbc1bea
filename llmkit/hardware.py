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


MATMUL_PRECISIONS = ("highest", "high", "medium")


def set_matmul_precision(trainer: Mapping[str, Any]) -> None:
    """trainer.float32_matmul_precision: `high` lets float32 matmuls use TF32 tensor cores on
    Ampere and newer GPUs (about 8x the FLOP/s of full float32, 10 mantissa bits instead of 23);
    it matters for precision=32 runs and for what autocast leaves in float32."""
    value = trainer.get("float32_matmul_precision")
    if value is None:
        return
    if value not in MATMUL_PRECISIONS:
        raise ValueError(f"trainer.float32_matmul_precision={value}: valid values are {', '.join(MATMUL_PRECISIONS)}")
    torch.set_float32_matmul_precision(value)

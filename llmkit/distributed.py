"""Applied from outside the model: torch.compile per block, and FSDP2 (`fully_shard`) per block,
then the root.

Lightning's ModelParallelStrategy hands the LightningModule a device mesh; `LitLM.configure_model`
calls `apply_fsdp` with it. The model code never imports anything from here.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from llmkit.checkpoint_files import replace_directory
from llmkit.model import Transformer
from llmkit.recompute import apply_activation_checkpointing  # noqa: F401  (re-exported: the strategies apply it too)


def mixed_precision_policy(precision: str | None):
    """bf16 parameters and activations for bf16 runs, with fp32 gradient reduction for accuracy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision is not None and "bf16" in str(precision):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


RESHARD_POLICIES = ("default", "always", "never")
FORWARD_METHODS = ("features", "logits_and_features")  # Transformer methods that run the model besides forward


def check_reshard_policy(value: str) -> None:
    if value not in RESHARD_POLICIES:
        raise ValueError(f"trainer.strategy.reshard_after_forward={value}: valid values are {', '.join(RESHARD_POLICIES)}")


def check_blocks_per_unit(value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"trainer.strategy.blocks_per_unit={value!r}: give a whole number of blocks, 1 or more")


def apply_fsdp(
    model: Transformer,
    device_mesh: DeviceMesh,
    precision: str | None = None,
    reshard_after_forward: str = "default",
    blocks_per_unit: int = 1,
) -> None:
    """Shard each run of `blocks_per_unit` consecutive blocks as one unit (its all-gather overlaps
    the previous unit's compute), then the root, which holds the embeddings, the final norm and the
    (possibly tied) head.

    reshard_after_forward: whether a unit frees its gathered parameters after its forward pass
    and gathers them again for the backward. always: least memory; never: one all-gather per unit
    and step instead of two, for the memory of the whole unsharded model (ZeRO-2); default: every
    unit but the last, whose parameters the backward pass needs first (torchtitan's choice).

    blocks_per_unit: every unit costs host time per step for its hooks and collectives whatever its
    size (about 0.3 ms on a 2-core CPU, beside FSDP2's per-parameter costs; scripts/bench_host_overhead.py:
    4 blocks per unit cut FSDP2's extra forward+backward host time by a quarter at 32 small blocks),
    so a model of many small blocks can leave the GPU waiting on the host. Larger units hold more
    gathered parameters at once. Parameter names, and so checkpoints, do not change."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    check_reshard_policy(reshard_after_forward)
    check_blocks_per_unit(blocks_per_unit)
    mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names else device_mesh
    policy = mixed_precision_policy(precision)
    blocks = list(model.blocks)
    units = [blocks[i : i + blocks_per_unit] for i in range(0, len(blocks), blocks_per_unit)]
    for i, unit in enumerate(units):
        reshard = reshard_after_forward == "always" or (reshard_after_forward == "default" and i < len(units) - 1)
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward != "never")
    for method in FORWARD_METHODS:  # called instead of forward (reward and value heads): gather the root too
        register_fsdp_forward_method(model, method)


def shard_heads(objective: nn.Module, device_mesh: DeviceMesh, precision: str | None = None) -> None:
    """The objective's own layers (a reward model's score head, PPO's value head) sharded as the model is:
    Lightning's FSDP strategy does not wrap the LightningModule, so without this their gradients would
    never be reduced across ranks (each rank's head would drift its own way), and gradient clipping would
    meet plain tensors beside the model's sharded ones."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names else device_mesh
    for head in objective.children():
        if any(p.requires_grad for p in head.parameters()):
            fully_shard(head, mesh=mesh, mp_policy=mixed_precision_policy(precision))


def apply_compile(model: Transformer) -> None:
    """Compile each block in place: identical blocks share one compiled graph, compilation is
    far quicker than for the whole model, and FSDP can still wrap the compiled blocks."""
    for block in model.blocks:
        block.compile()


def hydra_rank_command(local_rank: int) -> tuple[list[str], str]:
    """The command Lightning runs to start DDP rank `local_rank` (> 0) on this node.

    Lightning's own version re-runs the script with the parent's sys.argv, so inside a Hydra
    multirun every rank starts the whole sweep again. Start each rank as a single run of the
    current job instead: the job's own overrides and its output directory. `python -m llmkit train`
    is the same app whether rank 0 came from `llmkit train` or `python train.py`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra_cfg = HydraConfig.get()
    command = [
        sys.executable, "-m", "llmkit", "train", *hydra_cfg.overrides.task,
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"', f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",  # rank 0 already wrote the config
    ]
    return command, get_original_cwd()


def use_hydra_rank_command() -> None:
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = hydra_rank_command


def ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def choose_rendezvous_port(trainer: Any) -> None:
    """Set MASTER_PORT for a run whose ranks Lightning starts itself on this machine, unless set.

    Lightning would take a free port from the kernel's ephemeral range, the range every outgoing
    connection on the machine takes its own port from, and rank 0 listens on it only seconds later,
    after starting the other ranks: meanwhile any connection (a rank connecting early among them,
    which can be given the very port it connects to) may take it, and rank 0 then fails with
    EADDRINUSE while the other ranks wait. A free port below the ephemeral range is not handed out
    that way. Where SLURM or torchrun start the ranks, every rank must derive the same port, so
    this leaves them alone."""
    if "MASTER_PORT" in os.environ or not _launches_ranks(trainer):
        return
    low = min(ephemeral_port_range()[0], 32768)
    draw = random.SystemRandom()  # not the seeded generator: concurrent runs with one seed must differ
    for _ in range(100):
        port = draw.randrange(20000, low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        os.environ["MASTER_PORT"] = str(port)
        return


def _subprocess_launcher(trainer: Any) -> Any:
    """Lightning's launcher that starts a node's other ranks as child processes of rank 0, or None."""
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    return launcher if isinstance(launcher, _SubprocessScriptLauncher) else None


def _launches_ranks(trainer: Any) -> bool:
    launcher = _subprocess_launcher(trainer)
    # under SLURM or torchrun the launcher exists but starts nothing: the ranks are started outside
    # (asked before the launch: Lightning's own environment reads LOCAL_RANK, which the launch sets)
    return launcher is not None and not launcher.cluster_environment.creates_processes_externally


def stop_child_ranks(trainer: Any) -> None:
    """Lightning starts a node's other ranks as child processes of rank 0 and, when rank 0 fails
    with an error (Ctrl-C aside), leaves them waiting for it in a collective until the process
    group's timeout, half an hour later. They cannot go on without rank 0: stop them with it."""
    launcher = _subprocess_launcher(trainer)
    if launcher is not None and launcher.procs:  # the ranks this process started
        launcher.kill(signal.SIGKILL)


@contextlib.contextmanager
def process_group_scope() -> Iterator[None]:
    """Leave no distributed state behind when a run ends: Lightning's DDP launcher sets
    MASTER_PORT, LOCAL_RANK, WORLD_SIZE... in this process and keeps the process group alive, so the
    next job of a Hydra multirun would take itself for an already-launched rank on a dead group."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy (ModelParallelStrategy) with llmkit's FSDP options, which
    `LitLM.configure_model` passes to `apply_fsdp`, and atomic checkpoints: sharded checkpoints are
    written into `<name>.tmp` first (every rank its shard), and only when all are done does rank 0
    swap it into place."""

    def __init__(
        self, *args: Any, reshard_after_forward: str = "default", blocks_per_unit: int = 1, **kwargs: Any
    ) -> None:
        check_reshard_policy(reshard_after_forward)  # when the trainer is built, before any work
        check_blocks_per_unit(blocks_per_unit)
        super().__init__(*args, **kwargs)
        self.fsdp_options = {"reshard_after_forward": reshard_after_forward, "blocks_per_unit": blocks_per_unit}

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(path.name + ".tmp")
        if self.global_rank == 0 and tmp.is_dir():  # left by a crash during an earlier save
            shutil.rmtree(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.global_rank == 0:
            if tmp.is_dir():
                replace_directory(tmp, path)
            else:  # save_distributed_checkpoint=false: one consolidated file
                os.replace(tmp, path)
        self.barrier()

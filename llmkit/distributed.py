"""Applied from outside the model: torch.compile per block, and FSDP2 (`fully_shard`) per block,
then the root.

Lightning's ModelParallelStrategy hands the LightningModule a device mesh; `LitLM.configure_model`
calls `apply_fsdp` with it. The model code never imports anything from here.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from llmkit.model import Transformer


def mixed_precision_policy(precision: str | None):
    """bf16 parameters and activations for bf16 runs, with fp32 gradient reduction for accuracy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision is not None and "bf16" in str(precision):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: Transformer, device_mesh: DeviceMesh, precision: str | None = None) -> None:
    """Shard each block on its own (its all-gather overlaps the previous block's compute), then
    the root, which holds the embeddings, the final norm and the (possibly tied) head."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names else device_mesh
    policy = mixed_precision_policy(precision)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def apply_compile(model: Transformer) -> None:
    """Compile each block in place: identical blocks share one compiled graph, compilation is
    far quicker than for the whole model, and FSDP can still wrap the compiled blocks."""
    for block in model.blocks:
        block.compile()

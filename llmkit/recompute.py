"""Activation checkpointing, applied from outside the model like FSDP and compile (torch only, so
the planner can apply it to a meta model without importing Lightning)."""

from __future__ import annotations

from llmkit.model import Transformer


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """Recompute block activations in the backward pass instead of storing them.

    full:      every block (least memory, about one extra forward of compute);
    selective: every other block (about half the saving for half the recompute);
    none:      nothing. State-dict keys are unchanged (the wrapper strips its prefix)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    every = {"none": 0, "full": 1, "selective": 2}
    if mode not in every:
        raise ValueError(f"activation_checkpointing={mode}: valid values are {', '.join(every)}")
    if every[mode] == 0:
        return
    for i, block in enumerate(model.blocks):
        if i % every[mode] == 0:
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)

"""Parallelism helpers applied from outside the model."""

import pytest
import torch

from llmkit.distributed import FSDP2Strategy, apply_activation_checkpointing, apply_fsdp
from tests.model.helpers import VOCAB, tiny_model


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_loss_gradients_and_state_dict_keys(mode: str) -> None:
    plain, checkpointed = tiny_model(n_layers=3), tiny_model(n_layers=3)
    apply_activation_checkpointing(checkpointed, mode)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    wrapped = [type(b).__name__ == "CheckpointWrapper" for b in checkpointed.blocks]
    assert wrapped == ([True, True, True] if mode == "full" else [True, False, True])
    idx = torch.randint(0, VOCAB, (2, 17))
    losses = [m.loss(idx[:, :-1], idx[:, 1:]).loss for m in (plain, checkpointed)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_unknown_activation_checkpointing_mode_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="none, full, selective"):
        apply_activation_checkpointing(tiny_model(), "every")


@pytest.fixture
def one_rank_mesh():
    """A real (gloo, world size 1) process group and device mesh, so fully_shard runs in-process.
    An in-memory store: a TCP store would hold a port for the rest of the session."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("policy", "kept"), [("default", [False, False, True]), ("always", [False, False, False]), ("never", [True, True, True])]
)
def test_reshard_after_forward_policy_decides_which_blocks_keep_gathered_parameters(one_rank_mesh, policy, kept) -> None:
    from torch.distributed.tensor import DTensor

    model = tiny_model(n_layers=3)
    apply_fsdp(model, one_rank_mesh, reshard_after_forward=policy)
    idx = torch.randint(0, VOCAB, (2, 8))
    model.loss(idx, idx)  # forward only: between forward and backward is where the policy shows
    # a block that resharded holds its sharded DTensor parameters again; one that did not, the gathered tensors
    assert [not isinstance(block.norm_2.weight, DTensor) for block in model.blocks] == kept


def test_unknown_reshard_policy_fails_when_the_strategy_is_built() -> None:
    with pytest.raises(ValueError, match="reshard_after_forward=sometimes: valid values are default, always, never"):
        FSDP2Strategy(reshard_after_forward="sometimes")

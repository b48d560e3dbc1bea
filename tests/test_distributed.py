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


@pytest.mark.parametrize(("layers", "per_unit", "kept"), [(4, 2, [False, False, True, True]), (5, 2, [False] * 4 + [True])])
def test_blocks_per_unit_groups_consecutive_blocks_into_one_fsdp_unit(one_rank_mesh, layers, per_unit, kept) -> None:
    """Units [0, 1], [2, 3] (, [4]): under the default policy the whole last unit keeps its gathered
    parameters after the forward pass, so a grouped block behaves as one unit with its neighbour."""
    from torch.distributed.tensor import DTensor

    model = tiny_model(n_layers=layers)
    apply_fsdp(model, one_rank_mesh, blocks_per_unit=per_unit)
    idx = torch.randint(0, VOCAB, (2, 8))
    model.loss(idx, idx)
    assert [not isinstance(block.norm_2.weight, DTensor) for block in model.blocks] == kept


def test_grouped_units_compute_the_loss_and_gradients_of_the_unsharded_model(one_rank_mesh) -> None:
    torch.manual_seed(0)
    plain = tiny_model(n_layers=3)
    sharded = tiny_model(n_layers=3)
    sharded.load_state_dict(plain.state_dict())
    apply_fsdp(sharded, one_rank_mesh, blocks_per_unit=2)
    idx = torch.randint(0, VOCAB, (2, 8))
    for model in (plain, sharded):
        model.loss(idx, idx).loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters()}
    assert grads.keys() == {n for n, _ in plain.named_parameters()}, "names (and checkpoints) unchanged"
    for name, param in plain.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_a_bad_blocks_per_unit_fails_when_the_strategy_is_built(value) -> None:
    with pytest.raises(ValueError, match="blocks_per_unit=.*whole number of blocks, 1 or more"):
        FSDP2Strategy(blocks_per_unit=value)


def test_unknown_reshard_policy_fails_when_the_strategy_is_built() -> None:
    with pytest.raises(ValueError, match="reshard_after_forward=sometimes: valid values are default, always, never"):
        FSDP2Strategy(reshard_after_forward="sometimes")


@pytest.mark.parametrize(("per_unit", "kept"), [(1, [False, False, False, True]), (2, [False, False, True, True])])
def test_the_lightning_module_takes_blocks_per_unit_from_the_strategy(one_rank_mesh, per_unit, kept) -> None:
    """configure_model reads the option from FSDP2Strategy: the last unit's blocks keep their
    gathered parameters after a forward pass, one block or two."""
    from types import SimpleNamespace

    from torch.distributed.tensor import DTensor

    from llmkit.lit.module import LitLM

    model = dict(vocab_size=VOCAB, d_model=16, n_layers=4, n_heads=2, max_seq_len=16)
    lit = LitLM(model=model, optim={"name": "adamw", "lr": 1e-3}, scheduler={"name": "constant"})
    lit._device_mesh = one_rank_mesh
    strategy = SimpleNamespace(fsdp_options={"reshard_after_forward": "default", "blocks_per_unit": per_unit})
    lit.trainer = SimpleNamespace(strategy=strategy, precision="32-true")
    lit.configure_model()
    idx = torch.randint(0, VOCAB, (2, 8))
    lit.model.loss(idx, idx)
    assert [not isinstance(block.norm_2.weight, DTensor) for block in lit.model.blocks] == kept

"""Parallelism helpers applied from outside the model."""

import pytest
import torch

from llmkit.distributed import apply_activation_checkpointing
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

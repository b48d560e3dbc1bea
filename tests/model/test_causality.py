"""Changing token t must leave every logit before t unchanged, for every combination of
block x position x attention option x ffn."""

import itertools

import pytest
import torch

from tests.model.helpers import VOCAB, tiny_model

BLOCKS = ["pre_ln", "post_ln"]
POSITIONS = ["none", "learned", "sinusoidal", "rope", "alibi", "t5"]
ATTENTION = {
    "mha": {"n_kv_heads": None},
    "gqa": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "sliding_window": {"n_kv_heads": None, "window": 5},
}
FFNS = ["mlp", "swiglu", "moe"]  # moe: its defaults, 8 experts, top-2, dropless


@pytest.mark.parametrize(
    "block,position,attention,ffn", list(itertools.product(BLOCKS, POSITIONS, ATTENTION, FFNS))
)
def test_changing_a_token_never_changes_earlier_logits(block: str, position: str, attention: str, ffn: str) -> None:
    model = tiny_model(
        block={"name": block}, position={"name": position}, ffn={"name": ffn},
        attention={"name": "causal", **ATTENTION[attention]},
    )
    idx = torch.randint(0, VOCAB, (2, 20))
    t = 11
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=1e-5)
    # the change must be visible from t on, else the test could pass on a model that ignores input
    assert (before[:, t] - after[:, t]).abs().max() > 1e-4

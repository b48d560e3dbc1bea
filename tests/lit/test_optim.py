import math

import pytest
import torch

from llmkit.lit.optim import OPTIMIZERS, SCHEDULES, param_groups
from tests.model.helpers import tiny_model


def test_matrices_decay_and_vectors_do_not_and_tied_weights_appear_once() -> None:
    model = tiny_model(bias=True, tie_embeddings=True)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # parameters() dedups tied weights
    assert any(p is model.tok_emb.weight for p in decay["params"])


def test_unknown_optimizer_lists_valid_names() -> None:
    with pytest.raises(KeyError, match="valid names: adamw"):
        OPTIMIZERS.build("adam_w", model=tiny_model())


def test_cosine_warms_up_linearly_then_decays_to_the_floor() -> None:
    f = SCHEDULES.build("cosine", total_steps=1000, warmup_steps=100, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(1 / 101) and f(99) == pytest.approx(100 / 101)
    assert f(100) == pytest.approx(1.0)
    assert f(550) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(1000) == pytest.approx(0.1) and f(5000) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(100, 1000))


def test_wsd_holds_then_decays_over_the_last_fraction() -> None:
    f = SCHEDULES.build("wsd", total_steps=1000, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert f(5) < 1.0 and f(10) == 1.0 and f(799) == 1.0
    assert f(900) == pytest.approx(0.5) and f(1000) == pytest.approx(0.0)


def test_constant_schedule() -> None:
    assert SCHEDULES.build("constant", total_steps=100)(50) == 1.0
    warm = SCHEDULES.build("constant", total_steps=100, warmup_steps=4)
    assert warm(0) == pytest.approx(0.2) and warm(10) == 1.0


def test_flops_per_token_counts_matmul_weights_and_attention() -> None:
    model = tiny_model(tie_embeddings=False, position={"name": "learned"})
    cfg = model.cfg
    lookups = model.tok_emb.weight.numel() + model.position.table.weight.numel()
    expected = 6 * (model.num_params() - lookups) + 12 * cfg.n_layers * cfg.d_model * 16
    assert model.flops_per_token(16) == expected


def test_adamw_step_changes_weights() -> None:
    model = tiny_model()
    optimizer = OPTIMIZERS.build("adamw", model=model, lr=1e-2)
    before = model.head.weight.detach().clone()
    idx = torch.randint(0, 37, (2, 9))
    model.loss(idx[:, :-1], idx[:, 1:]).loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.head.weight)

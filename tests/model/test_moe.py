"""Mixture of Experts: parity with the dense FFN and with a per-token reference, routing, the
balancing loss, capacity drops, gradients, the every-k-th-layer layout, and a training run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import llmkit.model.moe as moe_module
from llmkit.model import ModelConfig, Transformer
from llmkit.model.ffn import FFNS
from llmkit.model.init import init_weights
from llmkit.model.moe import MoE
from tests.model.helpers import VOCAB, tiny_model
from tests.test_training import metrics, train_here


def moe_layer(seed: int = 0, **options: object) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(16, **options)
    init_weights(layer, 0.02, 2)
    with torch.no_grad():  # larger router weights: distinct, confident choices
        layer.router.proj.weight.normal_(0.0, 1.0)
    return layer


def reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: sum_j weight_j * expert_j(x) (dropless)."""
    route = layer.router(x)
    e = layer.experts
    out = torch.zeros_like(x)
    for n in range(x.size(0)):
        for expert, weight in zip(route.experts[n].tolist(), route.weights[n], strict=True):
            h = x[n] @ e.w_in[expert] + (e.b_in[expert] if e.b_in is not None else 0)
            y = e.activation(h) @ e.w_out[expert] + (e.b_out[expert] if e.b_out is not None else 0)
            out[n] += weight * y
    return out


@pytest.mark.parametrize("expert", ["mlp", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_one_expert_top1_equals_the_dense_ffn_with_the_same_weights(expert: str, bias: bool) -> None:
    torch.manual_seed(0)
    dense = FFNS.build(expert, d_model=16, bias=bias)
    for p in dense.parameters():
        nn.init.normal_(p, 0.0, 0.2)
    sizes = {"mlp": (4.0, 1), "swiglu": (8 / 3, 32)}[expert]
    layer = MoE(16, n_experts=1, top_k=1, expert=expert, hidden_mult=sizes[0], multiple_of=sizes[1], bias=bias)
    with torch.no_grad():
        if expert == "mlp":
            w_in, b_in = dense.w_in.weight.t(), dense.w_in.bias
        else:  # gate and up side by side, as SwiGLUExperts chunks them
            w_in = torch.cat([dense.w_gate.weight.t(), dense.w_up.weight.t()], dim=1)
            b_in = torch.cat([dense.w_gate.bias, dense.w_up.bias]) if bias else None
        layer.experts.w_in.copy_(w_in[None])
        layer.experts.w_out.copy_(dense.w_out.weight.t()[None])
        if bias:
            layer.experts.b_in.copy_(b_in[None])
            layer.experts.b_out.copy_(dense.w_out.bias[None])
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("expert", ["mlp", "swiglu"])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "matmul_per_expert"])
def test_dispatch_matches_a_token_by_token_reference(expert: str, grouped: bool, monkeypatch) -> None:
    if not grouped:
        monkeypatch.setattr(moe_module, "_grouped_mm_applies", lambda x, w: False)
    elif not moe_module._grouped_mm_applies(torch.zeros(4, 16), torch.zeros(2, 16, 32)):
        pytest.skip("this torch has no CPU grouped matmul")
    layer = moe_layer(expert=expert, n_experts=4, top_k=2, bias=True)
    with torch.no_grad():
        for b in (layer.experts.b_in, layer.experts.b_out):
            b.normal_()
    x = torch.randn(40, 16)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_router_probabilities_and_weights_are_normalised(router: str) -> None:
    layer = moe_layer(router=router, n_experts=6, top_k=3)
    route = layer.router(torch.randn(50, 16))
    assert (route.probs >= 0).all() and (route.weights >= 0).all()
    torch.testing.assert_close(route.probs.sum(-1), torch.ones(50))
    torch.testing.assert_close(route.weights.sum(-1), torch.ones(50))
    assert route.experts.shape == (50, 3) and (route.experts.sort(-1).values.diff(dim=-1) > 0).all(), "distinct experts"
    # the chosen experts are the best scored ones
    assert (route.probs.gather(1, route.experts).min(-1).values >= route.probs.topk(3).values[:, -1] - 1e-7).all()


def test_unnormalised_softmax_weights_are_the_router_probabilities() -> None:
    layer = moe_layer(n_experts=6, top_k=2, normalize_weights=False)
    route = layer.router(torch.randn(50, 16))
    torch.testing.assert_close(route.weights, route.probs.gather(1, route.experts))


def _routed_to(layer: MoE, experts: list[int], sharpness: float = 10.0) -> torch.Tensor:
    """Inputs that the router sends to the given experts: router weight = identity * sharpness."""
    with torch.no_grad():
        layer.router.proj.weight.zero_()
        layer.router.proj.weight[:, : layer.n_experts] = sharpness * torch.eye(layer.n_experts)
    x = torch.zeros(len(experts), 16)
    x[torch.arange(len(experts)), torch.tensor(experts)] = 1.0
    return x


def test_balancing_loss_is_at_its_minimum_of_one_under_uniform_routing() -> None:
    layer = moe_layer(n_experts=4, top_k=1, balance_coef=1.0, z_coef=0.0)
    layer(_routed_to(layer, [0, 1, 2, 3] * 5))  # each expert gets a fifth of the tokens, symmetric probabilities
    (balance,) = layer.pop_aux_losses().values()
    torch.testing.assert_close(balance, torch.tensor(1.0))
    metrics = layer.pop_metrics()
    assert all(metrics[f"moe/layer0/load_e{i}"] == 0.25 for i in range(4))

    layer(_routed_to(layer, [0] * 20))  # collapse onto expert 0: towards n_experts
    collapsed = layer.pop_aux_losses()["balance"]
    assert 3.9 < collapsed <= 4.0
    assert layer.pop_aux_losses() == {}, "popping clears"


def test_z_loss_is_the_mean_squared_log_partition() -> None:
    layer = moe_layer(n_experts=4, balance_coef=0.0, z_coef=0.5)
    x = torch.randn(30, 16)
    layer(x)
    expected = 0.5 * torch.logsumexp(layer.router.proj(x), -1).square().mean()
    torch.testing.assert_close(layer.pop_aux_losses()["z"], expected)


def _dropped_by_reference(experts: torch.Tensor, n_experts: int, capacity: int) -> set[tuple[int, int]]:
    """Walk the assignments in priority order (all first choices, then second choices; batch order
    within each) and drop those that find their expert full. Returns {(token, choice)}."""
    taken = [0] * n_experts
    dropped = set()
    for choice in range(experts.size(1)):
        for token in range(experts.size(0)):
            e = int(experts[token, choice])
            if taken[e] < capacity:
                taken[e] += 1
            else:
                dropped.add((token, choice))
    return dropped


@pytest.mark.parametrize("top_k,capacity_factor", [(1, 1.0), (2, 1.0), (2, 0.5), (3, 1.0)])
def test_capacity_drops_exactly_the_overflow_and_counts_it(top_k: int, capacity_factor: float) -> None:
    layer = moe_layer(seed=top_k, n_experts=4, top_k=top_k, capacity_factor=capacity_factor)
    with torch.no_grad():
        layer.router.proj.weight[0, 0] += 3.0  # unbalanced: expert 0 is popular
    x = torch.randn(64, 16)
    x[:, 0] = 1.0
    route = layer.router(x)
    capacity = math.ceil(capacity_factor * 64 * top_k / 4)
    dropped = _dropped_by_reference(route.experts, 4, capacity)
    assert dropped, "the test must overflow some expert"

    out = layer(x)
    stats = layer.pop_metrics()
    assert stats["moe/layer0/dropped_frac"].item() == pytest.approx(len(dropped) / (64 * top_k), abs=1e-7)
    # the output is the reference with the dropped assignments' weights set to zero
    weights = route.weights.clone()
    for token, choice in dropped:
        weights[token, choice] = 0.0
    layer.router.forward = lambda x: moe_module.Routing(route.logits, route.probs, route.experts, weights)
    layer.eval()  # dropless now, with the zeroed weights standing in for the drops
    torch.testing.assert_close(out, reference(layer, x), rtol=1e-5, atol=1e-6)


def test_dropless_never_drops_and_evaluation_is_dropless() -> None:
    dropless = moe_layer(n_experts=4, top_k=2)
    with torch.no_grad():
        dropless.router.proj.weight[0, 0] += 5.0
    x = torch.randn(64, 16)
    x[:, 0] = 1.0
    dropless(x)
    assert dropless.pop_metrics()["moe/layer0/dropped_frac"] == 0
    capped = moe_layer(n_experts=4, top_k=2, capacity_factor=0.5)
    capped.load_state_dict(dropless.state_dict())
    capped(x)
    assert capped.pop_metrics()["moe/layer0/dropped_frac"] > 0
    capped.eval()
    torch.testing.assert_close(capped(x), dropless(x))
    assert capped.pop_metrics()["moe/layer0/dropped_frac"] == 0


def test_every_selected_expert_and_the_router_receive_gradient() -> None:
    layer = moe_layer(n_experts=8, top_k=2, n_shared_experts=1, balance_coef=0.0, z_coef=0.0)
    x = torch.randn(200, 16)
    selected = set(layer.router(x).experts.flatten().tolist())
    assert len(selected) >= 6
    (layer(x) ** 2).sum().backward()
    for e in range(8):
        grads = [layer.experts.w_in.grad[e], layer.experts.w_out.grad[e]]
        assert all((g.abs().sum() > 0) == (e in selected) for g in grads), f"expert {e}"
    assert layer.router.proj.weight.grad.abs().sum() > 0, "the router learns through the routing weights"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.shared.parameters())


def test_shared_experts_add_a_dense_ffn_for_every_token() -> None:
    layer = moe_layer(n_experts=4, top_k=2, n_shared_experts=2, expert="mlp", hidden_mult=1.0, multiple_of=1)
    assert layer.shared.w_in.out_features == 2 * layer.experts.w_out.size(1)
    x = torch.randn(20, 16)
    torch.testing.assert_close(layer(x), reference(layer, x) + layer.shared(x), rtol=1e-5, atol=1e-6)


def test_every_kth_layer_is_moe_and_the_others_dense_of_the_expert_type() -> None:
    model = tiny_model(n_layers=6, ffn={"name": "moe", "every": 3, "expert": "mlp", "n_experts": 4})
    kinds = [type(block.ffn).__name__ for block in model.blocks]
    assert kinds == ["MLP", "MLP", "MoE", "MLP", "MLP", "MoE"]
    assert model.blocks[2].ffn.layer == 2 and model.blocks[2].ffn.n_experts == 4
    assert model.blocks[0].ffn.w_in.out_features == 4 * 32, "dense layers keep the dense default size"
    assert model.blocks[2].ffn.experts.w_out.size(1) == 2 * 32, "experts: dense size / top_k"


def test_expert_weights_are_initialised_like_the_dense_ffn() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=8, ffn={"name": "moe"}))
    experts = model.blocks[0].ffn.experts
    assert experts.w_in.std().item() == pytest.approx(0.02, rel=0.05)
    assert experts.w_out.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05), "residual projection"


def test_model_loss_includes_the_aux_losses_and_reports_metrics() -> None:
    model = tiny_model(n_layers=2, ffn={"name": "moe", "n_experts": 4, "top_k": 2})
    idx = torch.randint(0, VOCAB, (2, 20))
    out = model.loss(idx[:, :-1], idx[:, 1:])
    assert set(out.aux) == {f"blocks.{i}.ffn.{k}" for i in range(2) for k in ("balance", "z")}
    torch.testing.assert_close(out.loss, out.ce + sum(out.aux.values()))
    keys = ["router_entropy", "dropped_frac"] + [f"load_e{e}" for e in range(4)]
    expected = {f"moe/layer{i}/{k}" for i in range(2) for k in keys}
    assert set(out.metrics) == expected
    assert 0 < out.metrics["moe/layer0/router_entropy"] <= math.log(4) + 1e-6
    torch.testing.assert_close(sum(out.metrics[f"moe/layer1/load_e{e}"] for e in range(4)), torch.tensor(1.0))
    assert model.loss(idx[:, :-1], idx[:, 1:]).aux.keys() == out.aux.keys(), "each forward reports afresh"


def test_flops_count_active_expert_parameters_only() -> None:
    dense = tiny_model(ffn={"name": "mlp"})
    moe = tiny_model(ffn={"name": "moe", "expert": "mlp", "n_experts": 8, "top_k": 2})  # experts: 2x, two active
    router = sum(block.ffn.router.proj.weight.numel() for block in moe.blocks)
    assert moe.num_params() == dense.num_params() - 2 * 2 * 32 * 128 + 2 * 8 * 2 * 32 * 64 + router
    assert moe.flops_per_token(16) == dense.flops_per_token(16) + 6 * router


@pytest.mark.parametrize("options,error", [
    ({"n_experts": 4, "top_k": 5}, "top_k must be between 1 and n_experts=4"),
    ({"router": "sparsemax"}, "unknown moe router 'sparsemax'; valid names: sigmoid, softmax"),
    ({"expert": "glu"}, "unknown moe expert 'glu'; valid names: mlp, swiglu"),
    ({"capacity_factor": 0}, "capacity_factor must be > 0"),
])
def test_bad_options_fail_clearly(options: dict, error: str) -> None:
    with pytest.raises((ValueError, KeyError), match=error):
        tiny_model(ffn={"name": "moe", **options})


def test_misspelt_option_fails_even_where_every_layer_is_dense() -> None:
    with pytest.raises(TypeError, match="model.ffn=moe.*n_expert"):
        tiny_model(n_layers=2, ffn={"name": "moe", "every": 4, "n_expert": 4})


def test_a_tiny_moe_model_learns_a_fixed_batch() -> None:
    model = tiny_model(ffn={"name": "moe", "n_experts": 4, "top_k": 2, "capacity_factor": 1.0}).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, VOCAB, (4, 21))
    losses = []
    for _ in range(30):
        out = model.loss(idx[:, :-1], idx[:, 1:])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.ce.item())
    assert losses[-1] < 0.5 * losses[0]


def test_activation_checkpointing_recomputes_the_same_routing_losses_and_gradients() -> None:
    from llmkit.recompute import apply_activation_checkpointing

    ffn = {"name": "moe", "n_experts": 4, "top_k": 2, "capacity_factor": 1.0}
    plain, checkpointed = tiny_model(ffn=ffn).train(), tiny_model(ffn=ffn).train()
    apply_activation_checkpointing(checkpointed, "full")
    idx = torch.randint(0, VOCAB, (2, 21))
    outs = [m.loss(idx[:, :-1], idx[:, 1:]) for m in (plain, checkpointed)]
    for out in outs:
        out.loss.backward()
    torch.testing.assert_close(outs[1].loss, outs[0].loss)
    assert outs[1].aux.keys() == outs[0].aux.keys()
    assert "blocks.0.ffn.balance" in outs[1].aux, "logged names do not depend on wrappers"
    grads = [{n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in m.named_parameters()}
             for m in (plain, checkpointed)]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_moe_trains_through_train_py_and_logs_aux_losses_and_router_statistics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_here(run_dir, tmp_path / "cache", "model/ffn=moe", "model.ffn.n_experts=4", "model.ffn.expert=mlp", "model.ffn.every=2",
          "model.ffn.capacity_factor=1.0", "model.n_layers=2", "trainer.max_steps=60", "trainer.log_every_n_steps=5")
    losses = metrics(run_dir, "train/loss")  # logged at steps 4, 9, ..., 59
    first, last = losses[4], sum(losses[s] for s in (49, 54, 59)) / 3
    assert last < first - 0.5, f"loss {first:.3f} -> {last:.3f}"
    assert metrics(run_dir, "train/aux/blocks.1.ffn.balance") and metrics(run_dir, "train/aux/blocks.1.ffn.z")
    for key in ["router_entropy", "dropped_frac"] + [f"load_e{e}" for e in range(4)]:
        values = metrics(run_dir, f"train/moe/layer1/{key}")
        assert sorted(values) == list(range(4, 60, 5)), f"{key}: logged on logging steps only"
    assert not metrics(run_dir, "train/moe/layer0/router_entropy"), "layer 0 is dense"


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_weights", "fp32_weights_autocast"])
def test_cuda_grouped_matmul_matches_the_per_expert_loop(autocast: bool, monkeypatch) -> None:
    layer = moe_layer(n_experts=8, top_k=2, bias=True).cuda()
    if not autocast:
        layer = layer.bfloat16()
    x = torch.randn(512, 16, device="cuda", dtype=torch.float32 if autocast else torch.bfloat16)
    assert moe_module._grouped_mm_applies(x.bfloat16(), layer.experts.w_in.bfloat16())

    def run() -> list[torch.Tensor]:
        inputs = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = layer(inputs)
        assert out.dtype == torch.bfloat16
        params = [layer.experts.w_in, layer.experts.w_out, layer.experts.b_in, layer.router.proj.weight]
        return [out, *torch.autograd.grad(out.float().square().sum(), [inputs, *params])]

    grouped = run()
    monkeypatch.setattr(moe_module, "_grouped_mm_applies", lambda x, w: False)
    for a, b in zip(grouped, run(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())

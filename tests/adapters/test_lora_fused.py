"""LoraLinear's fused forward (the update added into the base output by one addmm_) computes the unfused
LoRA math, y = x W^T + b + scale * dropout(x) A^T B^T, with the same gradients for x, A, B and b."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llmkit.adapters.lora import LoraConfig, LoraLinear

U = 2.0**-24  # fp32 unit roundoff


def _layer(bias: bool, cfg: LoraConfig, in_f: int = 48, out_f: int = 80) -> LoraLinear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_f, out_f, bias=bias)
    linear.weight.requires_grad_(False)  # frozen, as apply_lora leaves it; the bias trains (the gradient is checked)
    lora = LoraLinear.adapt(linear, cfg)
    with torch.no_grad():  # B is zero at init, where the update would vanish and every comparison hold trivially
        lora.lora_B.normal_(0.0, 0.5)
    return lora


def _unfused(layer: LoraLinear, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The textbook formula in float64 (mask: dropout's kept-and-rescaled factors, or None)."""
    d = torch.float64
    h = x if mask is None else x * mask
    bias = None if layer.bias is None else layer.bias.to(d)
    base = F.linear(x.to(d), layer.weight.to(d), bias)
    return base + layer.lora_config.scale * (h.to(d) @ layer.lora_A.to(d).T) @ layer.lora_B.to(d).T


def _grads(out: torch.Tensor, tensors: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, tensors, g.to(out.dtype)))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 7), (21,)], ids=["3d", "2d"])
@pytest.mark.parametrize("rslora", [False, True])
def test_fused_forward_and_gradients_equal_the_unfused_math(bias: bool, shape: tuple[int, ...], rslora: bool) -> None:
    layer = _layer(bias, LoraConfig(r=4, alpha=8, rslora=rslora))
    x = torch.randn(*shape, layer.in_features).requires_grad_()
    g = torch.randn(*shape, layer.out_features)
    leaves = [x, layer.lora_A, layer.lora_B] + ([layer.bias] if bias else [])

    ours = layer(x)
    assert ours.shape == (*shape, layer.out_features) and ours.dtype == torch.float32
    ref = _unfused(layer, x, None)
    # Rounding error of a sum of products in fp32 is at most n u times the same sum over absolute values,
    # n the number of terms chained (Higham, Accuracy and Stability, ch. 3). The absolute-value problem
    # (|x|, |W|, |A|, |B|, |g|) gives those sums for the output and, through autograd, for every gradient.
    twin, x_abs = _abs(layer), x.detach().abs().requires_grad_()
    abs_out = _unfused(twin, x_abs, None)
    n_tokens = x.numel() // layer.in_features
    n = n_tokens + layer.in_features + layer.out_features + layer.lora_config.r + 2  # covers every chain below
    assert ((ours.double() - ref).abs() <= n * U * abs_out).all()
    update = (ref - F.linear(x.double(), layer.weight.double(), None if not bias else layer.bias.double())).abs()
    assert update.max() > 1e3 * (n * U * abs_out).max()  # a missing, doubled or mis-scaled update fails

    abs_leaves = [x_abs, twin.lora_A, twin.lora_B] + ([twin.bias] if bias else [])
    ours_g, ref_g, abs_g = _grads(ours, leaves, g), _grads(ref, leaves, g), _grads(abs_out, abs_leaves, g.abs())
    for got, want, bound, name in zip(ours_g, ref_g, abs_g, ("x", "A", "B", "bias"), strict=False):
        # dx = g W + s g B A (out + r terms), dA = s (g B)^T x (out, then N), dB = s g^T x A^T (in, then N),
        # db = sum of g over N: each within n u of its absolute-value twin
        assert ((got.double() - want).abs() <= n * U * bound).all(), name
    assert layer.weight.grad is None  # the frozen base's weight gradient is never formed


def _abs(layer: LoraLinear) -> LoraLinear:
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        for p in twin.parameters():
            p.abs_()
    return twin


def test_dropout_masks_the_adapter_input_only() -> None:
    layer = _layer(False, LoraConfig(r=4, alpha=8, dropout=0.5)).train()
    x = torch.randn(5, 9, layer.in_features)
    torch.manual_seed(3)
    ours = layer(x)
    torch.manual_seed(3)  # the same draw F.dropout made inside the layer
    mask = F.dropout(torch.ones_like(x), 0.5, True)
    ref = _unfused(layer, x, mask)
    n = layer.in_features + layer.lora_config.r + 2
    with torch.no_grad():
        abs_ref = _unfused(_abs(layer), x.abs(), mask)
    assert ((ours.double() - ref).abs() <= n * U * abs_ref).all()
    assert (ref - _unfused(layer, x, None)).abs().max() > 1e-2  # the mask mattered: not vacuous
    layer.eval()
    assert ((layer(x).double() - _unfused(layer, x, None)).abs() <= n * U * _unfused(_abs(layer), x.abs(), None)).all()


def test_under_bf16_autocast_the_update_runs_in_bf16_and_trains_fp32_adapters() -> None:
    layer = _layer(True, LoraConfig(r=4, alpha=8))
    x = torch.randn(4, 6, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = layer(x)
    assert ours.dtype == torch.bfloat16
    ours.float().square().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    ref = _unfused(layer, x, None)
    # bf16 keeps 8 significant bits: inputs, weights and the product each round by 2^-9 relative, so the
    # result is within a few times 2^-8 of the magnitudes involved
    assert ((ours.double() - ref).abs() <= 4 * 2.0**-8 * _unfused(_abs(layer), x.abs(), None)).all()


def test_with_b_zero_the_layer_is_the_base_linear_bit_for_bit() -> None:
    layer = _layer(True, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        layer.lora_B.zero_()
    x = torch.randn(3, 5, layer.in_features)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))

"""QLoRA: NF4 / int8 round trips within the format's bound, a QLoRA model at init computes the dequantized
base exactly, gradients reach only the adapters, merging goes into the dequantized base, and peft loads the
adapters onto the dequantized base's export with the same logits. Tiny models, nothing downloaded."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from llmkit.adapters.lora import LoraConfig, lora_disabled, lora_layers, merge_lora, strip_merged
from llmkit.adapters.qlora import (
    NF4_LEVELS,
    SCALE_GROUP,
    QLoraLinear,
    QuantConfig,
    QuantLinear,
    apply_qlora,
    dequantize_model,
    dequantize_weight,
    quant_fingerprint,
    quantize_linears,
    quantize_weight,
    quantized_layers,
    quantized_nbytes,
    resident_bytes,
)
from tests.adapters.test_lora import EVERY_LINEAR, LLAMA, _ids, _is_adapter, _randomise_adapters
from tests.model.helpers import tiny_model

LEVELS = torch.tensor(NF4_LEVELS, dtype=torch.float64)


def _gaussian(shape: tuple[int, int] = (384, 320), seed: int = 0) -> torch.Tensor:
    # 122,880 weights: 1920 blocks of 64, 7.5 groups of 256 scales (the last one padded)
    return 0.02 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _stored_scales(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, the scale the codes were computed against) in float64, one row per block."""
    ones = quantize_weight(torch.ones_like(w), cfg)  # every value 1: its dequantization is the stored scale
    q = quantize_weight(w, cfg)
    q["q_codes"] = ones["q_codes"]
    stored = dequantize_weight(q, cfg, w.shape, torch.float32).double().view(-1, cfg.block_size)
    return w.double().view(-1, cfg.block_size).abs().amax(dim=1, keepdim=True), stored


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_takes_the_nearest_level_of_each_block(double_quant: bool) -> None:
    cfg = QuantConfig(quant_type="nf4", block_size=64, double_quant=double_quant)
    w = _gaussian()
    restored = dequantize_weight(quantize_weight(w, cfg), cfg, w.shape, torch.float32).double().view(-1, 64)
    absmax, scale = _stored_scales(w, cfg)
    x = w.double().view(-1, 64)
    # The format's bound: each weight becomes scale * (the NF4 level nearest to w / scale). Its error is the
    # distance to that nearest level, at most half the widest gap (0.152: between -1 and -0.696) times the scale.
    nearest = (x / scale).unsqueeze(-1).sub(LEVELS).abs().amin(dim=-1) * scale
    # fp32 arithmetic in the quantizer (w / scale, level * scale): a few ulps of the weight
    ulps = 4 * torch.finfo(torch.float32).eps * absmax
    assert ((restored - x).abs() <= nearest + ulps).all()
    assert ((restored - x).abs() <= LEVELS.diff().max() / 2 * scale + ulps).all()
    if double_quant:  # the uint8 scales: within half a step of their group's [min, max] range, no more
        groups = torch.nn.functional.pad(absmax.flatten(), (0, -absmax.numel() % SCALE_GROUP)).view(-1, SCALE_GROUP)
        step = (groups.amax(dim=1) - groups.amin(dim=1)) / 255
        step = step.repeat_interleave(SCALE_GROUP)[: absmax.numel()].unsqueeze(1)
        assert ((scale - absmax).abs() <= step / 2 + ulps).all()
    else:
        assert (scale == absmax).all()
    # NF4 is built for normal weights: relative RMS error about 0.09 at block 64 (0.0920 measured here); a
    # wrong level table, scale or packing order gives errors of the order of the weights themselves
    assert (restored - x).norm() / x.norm() < 0.1
    assert ((restored - x).abs() > 0).any()  # a real quantization, not the identity


def test_int8_round_trip_is_within_half_a_step() -> None:
    cfg = QuantConfig(quant_type="int8", block_size=128, double_quant=False)
    w = _gaussian()
    restored = dequantize_weight(quantize_weight(w, cfg), cfg, w.shape, torch.float32).double().view(-1, 128)
    absmax = w.double().view(-1, 128).abs().amax(dim=1, keepdim=True)
    ulps = 4 * torch.finfo(torch.float32).eps * absmax
    assert ((restored - w.double().view(-1, 128)).abs() <= absmax / 254 + ulps).all()  # step absmax / 127


def test_nf4_storage_is_four_bits_plus_the_scales() -> None:
    w = _gaussian()
    q = quantize_weight(w, QuantConfig())
    n = w.numel()
    groups = -(-n // 64 // SCALE_GROUP)
    assert {k: t.numel() * t.element_size() for k, t in q.items()} == {
        "q_codes": n // 2, "q_scales": groups * SCALE_GROUP, "q_scale_lo": 4 * groups, "q_scale_step": 4 * groups}
    for cfg in (QuantConfig(), QuantConfig(quant_type="int8", block_size=32, double_quant=False)):
        assert quantized_nbytes(n, cfg) == sum(t.numel() * t.element_size() for t in quantize_weight(w, cfg).values())
    odd = torch.randn(7, 9)  # 63 weights: one block, zero-padded, sliced off again
    cfg = QuantConfig(double_quant=False)
    assert dequantize_weight(quantize_weight(odd, cfg), cfg, (7, 9), torch.float32).shape == (7, 9)


def _qlora(lora: LoraConfig, quant: QuantConfig | None = None, **overrides: object) -> tuple[nn.Module, nn.Module]:
    """(the dequantized base as a plain model, a QLoRA model over the same quantized base)."""
    base = tiny_model(**overrides)
    model = copy.deepcopy(base)
    apply_qlora(model, lora, quant or QuantConfig())
    with torch.no_grad():
        for name, m in quantized_layers(model):
            base.get_submodule(name).weight.copy_(m.dequantized(torch.float32))
    return base, model


def test_at_init_a_qlora_model_computes_the_dequantized_base_exactly() -> None:
    base, model = _qlora(LoraConfig(r=4, alpha=8), **LLAMA)
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {n for n, k in kinds.items() if k is QLoraLinear} == {n for n, _ in lora_layers(model)} != set()
    assert {n for n, k in kinds.items() if k is QuantLinear} == {f"blocks.{i}.ffn.{w}" for i in (0, 1)
                                                                 for w in ("w_gate", "w_up", "w_out")}
    assert kinds["head"] is nn.Linear  # outside blocks.*: kept as it was
    # no full-precision copy of a quantized weight is left, and none is saved
    assert not any(n.endswith(".weight") and n.startswith("blocks.") and "norm" not in n for n, _ in model.named_parameters())
    assert {k for k in model.state_dict() if not _is_adapter(k)} < base.state_dict().keys()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))  # same F.linear on the same weights; B == 0 adds exactly 0
        assert not torch.allclose(model(ids), tiny_model(**LLAMA)(ids), atol=1e-4)  # and the base did change


def test_gradient_reaches_only_the_adapters_and_the_input_gradient_is_exact() -> None:
    base, model = _qlora(LoraConfig(r=4, alpha=8, targets=EVERY_LINEAR), **LLAMA)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    ids = _ids()
    model.loss(ids, ids.roll(-1, dims=1)).loss.backward()
    for name, p in model.named_parameters():
        assert p.requires_grad == _is_adapter(name) and (p.grad is not None) == _is_adapter(name), name
    assert all(m.lora_B.grad.abs().max() > 0 for _, m in lora_layers(model))
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())  # the base never moves
    # backward dequantizes again instead of saving W: the input gradient equals nn.Linear's
    plain = nn.Linear(48, 40)
    layer = copy.deepcopy(plain)
    quantize_linears(nn.ModuleDict({"l": layer}), QuantConfig(quantize=["l"]))
    assert isinstance(layer, QuantLinear)
    plain.weight.data.copy_(layer.weight)
    x = torch.randn(3, layer.in_features, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    (layer(x) * torch.arange(layer.out_features)).sum().backward()
    (plain(x2) * torch.arange(layer.out_features)).sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_merging_goes_into_the_dequantized_base_and_disabling_gives_it() -> None:
    base, model = _qlora(LoraConfig(r=4, alpha=8, targets=EVERY_LINEAR), QuantConfig(quant_type="int8"), **LLAMA)
    _randomise_adapters(model)
    ids = _ids()
    with torch.no_grad():
        adapted = model(ids)
        with lora_disabled(model):
            assert torch.equal(model(ids), base(ids))
        assert (adapted - base(ids)).abs().max() > 1e-2
        dequantize_model(model)
        assert not quantized_layers(model)
        merge_lora(model, keep_original=False)
        strip_merged(model)
        assert set(model.state_dict()) == set(base.state_dict())
        # x (W + s B A)^T against x W^T + s (x A^T) B^T: fp32 sums in another order, far below the 1e-2 above
        torch.testing.assert_close(model(ids), adapted, rtol=0, atol=1e-5)


def test_autocast_dequantizes_into_the_compute_dtype() -> None:
    _, model = _qlora(LoraConfig(r=4, alpha=8), **LLAMA)
    ids = _ids()
    with torch.no_grad():
        fp32 = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(ids)
    # bf16 keeps 8 significant bits (relative 2^-8 per rounding) over a few dozen roundings: logits of
    # size ~1 agree to ~0.1; quantization in the wrong place would not keep them this close
    assert bf16.dtype == torch.bfloat16 or bf16.dtype == torch.float32
    torch.testing.assert_close(bf16.float(), fp32, rtol=0, atol=0.15)


def test_fingerprint_and_resident_bytes() -> None:
    full = tiny_model(**LLAMA)
    _, a = _qlora(LoraConfig(), **LLAMA)
    _, b = _qlora(LoraConfig(), **LLAMA)
    assert quant_fingerprint(a) == quant_fingerprint(b)  # deterministic: loading rebuilds the same base
    _, c = _qlora(LoraConfig(), QuantConfig(block_size=32), **LLAMA)
    assert quant_fingerprint(c) != quant_fingerprint(a)
    blocks = sum(p.numel() for n, p in full.named_parameters() if n.startswith("blocks.") and n.endswith("weight")
                 and "norm" not in n)
    adapters = sum(p.numel() * 4 for n, p in a.named_parameters() if _is_adapter(n))
    codes = sum(m.quantized_bytes() for _, m in quantized_layers(a))
    assert codes < blocks  # under a byte per weight even here (4 bits + a scale group padded to 256 per weight)
    # every fp32 block weight is gone: only the codes, the scales and the adapters are added
    assert resident_bytes(a) == resident_bytes(full) - 4 * blocks + codes + adapters


def test_bad_quantization_settings_fail_clearly() -> None:
    with pytest.raises(KeyError, match="nf4, int8|int8, nf4"):
        QuantConfig(quant_type="fp4")
    with pytest.raises(ValueError, match="block_size"):
        QuantConfig(block_size=63)
    with pytest.raises(ValueError, match="'layers.\\*' matches no Linear"):
        apply_qlora(tiny_model(), LoraConfig(), QuantConfig(quantize=["layers.*"]))


def test_the_router_and_a_tied_head_stay_in_full_precision() -> None:
    moe = tiny_model(**dict(LLAMA, ffn={"name": "moe", "n_experts": 4, "top_k": 2}))
    apply_qlora(moe, LoraConfig(), QuantConfig())
    assert all(".router." not in name for name, _ in quantized_layers(moe))
    tied = tiny_model(tie_embeddings=True)
    apply_qlora(tied, LoraConfig(), QuantConfig(quantize=["blocks.*", "head"]))
    assert type(tied.head) is nn.Linear


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft calls transformers
def test_peft_loads_the_adapters_onto_the_dequantized_base_with_the_same_logits(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from llmkit.hf import export_hf
    from llmkit.posttrain.peft_format import save_peft_adapter

    base, model = _qlora(LoraConfig(r=4, alpha=8, targets=EVERY_LINEAR), **LLAMA)
    _randomise_adapters(model)
    save_peft_adapter(model, None, tmp_path / "adapter")  # straight from the quantized model
    export_hf(base, None, tmp_path / "base")  # the dequantized base
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = _ids()
    with torch.no_grad():  # the same weights and adapters in fp32, other op order: as test_lora's 1e-5
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_merging_a_quantized_base_without_dequantizing_is_refused_by_name() -> None:
    from llmkit.adapters.lora import LoraConfig, merge_lora
    from llmkit.adapters.qlora import QuantConfig, apply_qlora, dequantize_model
    from tests.model.helpers import tiny_model

    model = tiny_model()
    apply_qlora(model, LoraConfig(r=2, targets=["blocks.*.attention.wqkv"]), QuantConfig())
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attention\.wqkv has a quantized base .*dequantize_model"):
        merge_lora(model)
    dequantize_model(model)
    merge_lora(model)  # then it merges

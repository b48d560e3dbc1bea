"""LoRA: exact at init, trains only the adapters, merges and unmerges exactly, disables to the base,
and loads in peft on top of the base that llmkit/hf.py exports (same logits). Tiny models, nothing downloaded."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from llmkit.adapters.lora import (
    LoraConfig,
    apply_lora,
    load_lora_state_dict,
    lora_disabled,
    lora_layers,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from llmkit.hf import ExportError, export_hf
from llmkit.model import Transformer
from llmkit.posttrain.peft_format import save_peft_adapter
from tests.model.helpers import VOCAB, tiny_model

# as in tests/export/test_hf.py: GQA (so q, k and v rows differ in count), untied head
LLAMA = dict(
    norm={"name": "rmsnorm", "eps": 1e-6}, position={"name": "rope", "theta": 500.0},
    ffn={"name": "swiglu", "hidden_mult": 8 / 3, "multiple_of": 16}, attention={"name": "causal", "n_kv_heads": 2},
    tie_embeddings=False,
)
EVERY_LINEAR = ["blocks.*.attention.*", "blocks.*.ffn.*", "head"]


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _adapted(cfg: LoraConfig, **overrides: object) -> tuple[Transformer, Transformer]:
    """(base, a LoRA copy of it)."""
    base = tiny_model(**overrides)
    model = copy.deepcopy(base)
    apply_lora(model, cfg)
    return base, model


@torch.no_grad()
def _randomise_adapters(model: Transformer) -> None:
    """B is zero at init, where every comparison of adapted and base outputs would hold trivially."""
    gen = torch.Generator().manual_seed(2)
    for _, m in lora_layers(model):
        m.lora_A.copy_(0.2 * torch.randn(m.lora_A.shape, generator=gen))
        m.lora_B.copy_(0.2 * torch.randn(m.lora_B.shape, generator=gen))


def _is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def test_at_init_the_adapted_model_is_the_base_bit_for_bit() -> None:
    base, model = _adapted(LoraConfig(r=4, alpha=8))
    assert [name for name, _ in lora_layers(model)] == [f"blocks.{i}.attention.{w}" for i in (0, 1) for w in ("wqkv", "wo")]
    ids = _ids()
    assert torch.equal(model(ids), base(ids))
    keys = model.state_dict().keys()  # base names unchanged (what export_hf reads); adapters added beside them
    assert {k for k in keys if not _is_adapter(k)} == base.state_dict().keys()
    assert {k for k in keys if _is_adapter(k)} == {f"{n}.{p}" for n, _ in lora_layers(model) for p in ("lora_A", "lora_B")}


@pytest.mark.parametrize(("rslora", "scale"), [(False, 8 / 4), (True, 8 / 4**0.5)])
def test_one_step_trains_only_adapters_and_merge_is_exact(rslora: bool, scale: float) -> None:
    base, model = _adapted(LoraConfig(r=4, alpha=8, targets=EVERY_LINEAR, rslora=rslora), **LLAMA)
    ids = _ids()
    model.loss(ids, ids.roll(-1, dims=1)).loss.backward()
    for name, p in model.named_parameters():
        assert p.requires_grad == _is_adapter(name), name
        assert (p.grad is not None) == _is_adapter(name), name
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    assert lora_state_dict(model).keys() == {n for n, _ in model.named_parameters() if _is_adapter(n)}

    with torch.no_grad():
        unmerged = model(ids)
        assert (unmerged - base(ids)).abs().max() > 1e-3  # the step moved the output: the checks below are not vacuous
        w0 = {name: m.weight.clone() for name, m in lora_layers(model)}
        merge_lora(model)
        for name, m in lora_layers(model):
            delta = scale * (m.lora_B @ m.lora_A)
            assert delta.abs().max() > 1e-4, name
            # two fp32 roundings (the product, the sum) apart from the weight merge_lora computes
            torch.testing.assert_close(m.weight, w0[name] + delta, rtol=0, atol=1e-7)
        # merged: x (W0 + s B A)^T; unmerged: x W0^T + s (x A^T) B^T. The same function summed in another
        # order: fp32 rounding (~1e-7 relative per op, logits of size ~1) stays far below 1e-5, while a
        # missing, doubled or wrongly scaled delta moves the logits by more than 1e-3 (checked above).
        torch.testing.assert_close(model(ids), unmerged, rtol=0, atol=1e-5)
        unmerge_lora(model)
        for name, m in lora_layers(model):
            assert torch.equal(m.weight, w0[name]), name  # merge kept W0: restored exactly
        assert torch.equal(model(ids), unmerged)


def test_unmerge_by_subtraction_restores_within_one_rounding_each_way() -> None:
    _, model = _adapted(LoraConfig(r=4, alpha=8, targets=EVERY_LINEAR), **LLAMA)
    _randomise_adapters(model)
    w0 = {name: m.weight.clone() for name, m in lora_layers(model)}
    merge_lora(model, keep_original=False)
    unmerge_lora(model)
    eps = torch.finfo(torch.float32).eps
    for name, m in lora_layers(model):
        # fl(fl(W0 + d) - d): each operation rounds by at most half an ulp of its result
        bound = eps * (w0[name].abs() + m.delta_weight().abs())
        assert ((m.weight - w0[name]).abs() <= bound).all(), name


def test_lora_disabled_computes_the_base() -> None:
    base, model = _adapted(LoraConfig(r=4, alpha=8, targets=EVERY_LINEAR), **LLAMA)
    _randomise_adapters(model)
    ids = _ids()
    with torch.no_grad():
        adapted = model(ids)
        assert not torch.allclose(adapted, base(ids))
        with lora_disabled(model):
            assert torch.equal(model(ids), base(ids))
        assert torch.equal(model(ids), adapted)
        merge_lora(model)
        with pytest.raises(RuntimeError, match="unmerge_lora"), lora_disabled(model):
            pass


def test_adapter_state_holds_only_the_adapters_and_loads_back() -> None:
    base, model = _adapted(LoraConfig(r=2, alpha=4))
    _randomise_adapters(model)
    state = lora_state_dict(model)
    assert state and all(_is_adapter(k) for k in state)
    assert sum(t.numel() for t in state.values()) < base.num_params() / 10
    fresh = copy.deepcopy(base)
    apply_lora(fresh, LoraConfig(r=2, alpha=4))
    load_lora_state_dict(fresh, state)
    ids = _ids()
    assert torch.equal(fresh(ids), model(ids))
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(fresh, {k: v for k, v in state.items() if "blocks.0" not in k})


def test_a_pattern_matching_nothing_fails_listing_the_linear_modules() -> None:
    model = tiny_model(**LLAMA)
    with pytest.raises(ValueError, match=r"'blocks\.\*\.attn\.\*' matches no Linear") as err:
        apply_lora(model, LoraConfig(targets=["blocks.*.attention.wqkv", "blocks.*.attn.*"]))
    for name in ("blocks.*.attention.wqkv", "blocks.*.attention.wo", "blocks.*.ffn.w_gate", "head"):
        assert name in str(err.value)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # untouched


def test_a_second_apply_adds_adapters_and_keeps_the_first_trainable() -> None:
    _, model = _adapted(LoraConfig(targets=["blocks.*.attention.wqkv"]), **LLAMA)
    apply_lora(model, LoraConfig(r=2, targets=["head"]))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"{m}.{p}" for m in ("blocks.0.attention.wqkv", "blocks.1.attention.wqkv", "head") for p in ("lora_A", "lora_B")]
    with pytest.raises(ValueError, match="head already has a LoRA adapter"):
        apply_lora(model, LoraConfig(targets=["head"]))


def test_stacked_moe_experts_and_the_router_fail_by_name() -> None:
    model = tiny_model(**dict(LLAMA, ffn={"name": "moe", "n_experts": 4, "top_k": 2}))
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.experts .*SwiGLUExperts.*w_in, w_out") as err:
        apply_lora(model, LoraConfig(targets=["blocks.*.ffn.*"]))
    assert "blocks.1.ffn.router.proj" in str(err.value)  # read as a raw weight: an adapter would never run


def test_merging_into_a_tied_head_is_refused() -> None:
    _, model = _adapted(LoraConfig(targets=["head"]), tie_embeddings=True)
    with pytest.raises(ValueError, match="shared"):
        merge_lora(model)


@pytest.mark.parametrize(
    ("lora", "overrides", "peft_adapted"),
    [
        # every Linear: the fused wqkv split three ways, FFN and head one to one, leaf names in target_modules
        (LoraConfig(r=4, alpha=8, targets=EVERY_LINEAR), {},
         {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")} | {"lm_head"}),
        # one layer's wqkv only, rsLoRA: full names, or peft would adapt layer 0 too
        (LoraConfig(r=4, alpha=8, dropout=0.1, targets=["blocks.1.attention.wqkv"], rslora=True), {},
         {f"model.layers.1.self_attn.{x}_proj" for x in "qkv"}),
        # a head tied to the embedding: export_hf writes no lm_head tensor, yet peft adapts the lm_head module
        (LoraConfig(r=2, alpha=2, targets=["head"]), {"tie_embeddings": True}, {"lm_head"}),
    ],
    ids=["every_linear", "one_wqkv_rslora", "tied_head"],
)
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # peft: merging a tied head
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft calls transformers
def test_peft_loads_the_adapter_on_the_exported_base(
    lora: LoraConfig, overrides: dict, peft_adapted: set[str], tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    _, model = _adapted(lora, **dict(LLAMA, **overrides))
    _randomise_adapters(model)
    export_hf(model, None, tmp_path / "base")  # the LoRA model itself: its base names are what hf.py expects
    save_peft_adapter(model, None, tmp_path / "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")} == peft_adapted
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)  # tiny models are in eval mode: dropout off on both sides
        with lora_disabled(model):
            assert not torch.allclose(model(ids), ours, atol=1e-3)  # the adapter matters
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_peft_export_is_for_llama_only(tmp_path: Path) -> None:
    _, model = _adapted(LoraConfig(), norm={"name": "layernorm"}, position={"name": "learned"}, ffn={"name": "mlp"})
    with pytest.raises(ExportError, match="llama models only; this model maps to gpt2"):
        save_peft_adapter(model, None, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()

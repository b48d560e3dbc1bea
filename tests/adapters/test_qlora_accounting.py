"""What a QLoRA model counts: its quantized base's weights in the parameter count that FLOPs and MFU use
(they are buffers, not parameters), and a DPO reference copy that holds the quantized base, not a
full-precision one. Tiny models, nothing downloaded."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmkit.adapters.lora import LoraConfig, apply_lora, lora_disabled, lora_layers
from llmkit.adapters.qlora import QuantConfig, apply_qlora, quantized_layers, resident_bytes
from llmkit.lit.callbacks import ThroughputMonitor
from llmkit.posttrain.objectives import DirectPreference, frozen_copy
from tests.adapters.test_lora import LLAMA, _ids, _randomise_adapters
from tests.model.helpers import tiny_model

ADAPTERS = LoraConfig(r=4, alpha=8)  # wqkv and wo; QLoRA quantizes every block Linear (the ffn's too)
WIDE = dict(LLAMA, d_model=128)  # block Linears well above the embedding, as in a real model


def _models() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(base, LoRA on it, QLoRA on it)."""
    base = tiny_model(**WIDE)
    lora, qlora = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(lora, ADAPTERS)
    apply_qlora(qlora, ADAPTERS, QuantConfig())
    return base, lora, qlora


def _mfu(model: torch.nn.Module, seq_len: int = 32) -> float:
    monitor = ThroughputMonitor(peak_flops_per_device=1e12)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(seq_len=seq_len, batch_size=2), global_step=0,
                              accumulate_grad_batches=1, world_size=1)
    monitor.on_train_start(trainer, SimpleNamespace(model=model))
    return monitor.mfu(tokens_per_s=1000.0, world_size=1)


def test_the_parameter_count_for_flops_and_mfu_includes_the_quantized_weights() -> None:
    base, lora, qlora = _models()
    quantized = sum(m.out_features * m.in_features for _, m in quantized_layers(qlora))
    adapters = sum(m.lora_A.numel() + m.lora_B.numel() for _, m in lora_layers(lora))
    params = sum(p.numel() for p in qlora.parameters())
    assert quantized > params / 2  # the block Linears are buffers now: most of the model is not a parameter
    # the same matmuls run over the dequantized weights as over the float32 ones: the same model FLOPs
    assert qlora.num_params() == params + quantized == lora.num_params() == base.num_params() + adapters
    assert qlora.flops_per_token(32) == lora.flops_per_token(32) > base.flops_per_token(32)
    assert _mfu(qlora) == _mfu(lora) > 0


def test_a_reference_copy_of_a_qlora_model_holds_the_quantized_base_and_computes_it() -> None:
    base, _, qlora = _models()
    with torch.no_grad():
        _randomise_adapters(qlora)  # the policy now differs from its base
    reference = frozen_copy(qlora)
    # the copy's bytes: the codes and scales, the unquantized embedding, head and norms, the (switched-off)
    # adapters, exactly what the policy holds. NF4 is 4.13 bits a weight against 32 (0.129x), on 97% of this
    # model's float32 bytes; the rest and the adapters make it 0.166x here. 0.35x bounds it with room; a
    # full-precision copy of the base would be 1.0x
    assert resident_bytes(reference) == resident_bytes(qlora) <= 0.35 * resident_bytes(base)
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    ids = _ids()
    with torch.no_grad(), lora_disabled(qlora):
        assert torch.equal(reference(ids), qlora(ids))  # the quantized base, bit for bit
    assert all(m.lora_enabled for _, m in lora_layers(qlora))  # the policy's adapters stay on


def test_dpo_copies_a_qlora_reference_after_quantization_and_others_at_attach() -> None:
    base, _, _ = _models()
    dpo = DirectPreference(reference="copy")
    model = copy.deepcopy(base)
    dpo.attach(model, None, "qlora")  # before the adapters, as LitLM calls it: a copy now would be float32
    assert dpo._copy.model is None
    apply_qlora(model, ADAPTERS, QuantConfig())
    dpo.on_fit_start(SimpleNamespace(model=model, device=torch.device("cpu")))
    assert resident_bytes(dpo._copy.model) == resident_bytes(model) < resident_bytes(base)
    for finetune in ("full", "lora"):  # unchanged: the base copied when attached
        other = DirectPreference(reference="copy")
        other.attach(base, None, finetune)
        assert resident_bytes(other._copy.model) == resident_bytes(base)


def test_online_rl_copies_a_qlora_reference_after_quantization() -> None:
    from llmkit.posttrain.rl import GRPO

    base, _, _ = _models()
    grpo = GRPO(num_generations=2, beta=0.1, reference="copy")
    model = copy.deepcopy(base)
    grpo.attach(model, None, "qlora")
    assert grpo._copy.model is None
    apply_qlora(model, ADAPTERS, QuantConfig())
    grpo._copy.place(model, torch.device("cpu"))  # at fit start
    assert resident_bytes(grpo._copy.model) == resident_bytes(model) < resident_bytes(base)


def test_a_qlora_dpo_run_with_a_copied_reference_starts_at_ln2(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # at the first step the policy is its quantized base (B == 0), so a reference that is that base gives every
    # pair a log-ratio of exactly 0 and the sigmoid loss ln 2; a full-precision copy would differ from the
    # policy by NF4's error on every logit, and the loss with it
    from tests.posttrain.helpers import longer_context, preference_records, write_jsonl
    from tests.posttrain.test_dpo import LN2, train_pairs

    base = longer_context(tiny_checkpoint, tmp_path / "base.ckpt", 64)
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records(40, seed=0))
    run = train_pairs(tmp_path / "dpo", base, data, "dpo", "finetune=qlora", "task.reference=copy", "trainer.max_steps=1",
                      "trainer.val_check_interval=1", "data.batch_size=4")
    with open(run / "csv" / "metrics.csv") as f:
        first = next(row for row in csv.DictReader(f) if row.get("train/loss"))
    assert float(first["train/loss"]) == pytest.approx(LN2, abs=1e-6), first

"""`llmkit train task=sft finetune=qlora`: adapter-only checkpoints that record the quantized base, load
merged into the dequantized base, export to peft, learn as well as LoRA, and resume bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmkit.checkpoint import adapted_from_checkpoint, load_checkpoint
from llmkit.cli import main as llmkit
from tests.posttrain.helpers import longer_context, parity_records, preference_records, write_jsonl
from tests.posttrain.test_posttrain_resume import killed_then_resumed
from tests.posttrain.test_sft import RUN, answer_accuracy

ADAPTERS = ["finetune.r=8", "finetune.targets=[blocks.*.attention.wqkv,blocks.*.attention.wo,blocks.*.ffn.w_up]",
            "optim.lr=1e-2", *RUN[:-2], "preflight=off"]


@pytest.fixture(scope="module")
def base(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return longer_context(tiny_checkpoint, tmp_path_factory.mktemp("base") / "base.ckpt", 64)


def sft(tmp: Path, base: Path, finetune: str, steps: int) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp / "parity.jsonl", parity_records(400, seed=0))
    run = tmp / "run"
    llmkit(["train", f"hydra.run.dir={run}", f"paths.data_dir={tmp / 'cache'}", "task=sft", f"init_from={base}",
            "data=sft", f"data.path={data}", "data.template=raw", f"finetune={finetune}", *ADAPTERS,
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}"])
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def short_run(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sft(tmp_path_factory.mktemp("qlora_short"), base, "qlora", 6)


def test_qlora_checkpoint_holds_the_adapters_and_how_the_base_was_quantized(short_run: Path, base: Path) -> None:
    checkpoint = torch.load(short_run, weights_only=True)
    info = checkpoint["lora"]
    assert info["base"] == str(base) and info["config"]["r"] == 8
    assert info["quant"]["config"] == {"quant_type": "nf4", "block_size": 64, "double_quant": True, "quantize": ["blocks.*"]}
    assert checkpoint["state_dict"] and all(k.endswith(("lora_A", "lora_B")) for k in checkpoint["state_dict"])
    adapted = adapted_from_checkpoint(checkpoint)  # the quantized base again: the same codes as in training
    assert sum(1 for name, _ in adapted.named_buffers() if name.endswith("q_codes")) == 2 * 5  # every block Linear
    merged = load_checkpoint(short_run).model  # merged into the dequantized base: plain Linear layers
    assert not any("lora" in name or "q_" in name for name in merged.state_dict())
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.no_grad():
        # merged x (W' + s B A)^T against unmerged x W'^T + s (x A^T) B^T on the same dequantized W': fp32 sums
        # in another order (logits of size ~10: 1e-5 is a hundred roundings); a merge into the full-precision
        # base would be off by the quantization error (checked to be far larger below)
        torch.testing.assert_close(merged(ids), adapted(ids), rtol=0, atol=1e-4)
        assert (load_checkpoint(base).model(ids) - merged(ids)).abs().max() > 1e-2


def test_a_changed_base_is_refused_when_loading_qlora_adapters(short_run: Path, base: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(short_run, weights_only=True)
    changed = torch.load(base, weights_only=True)
    key = next(k for k in changed["state_dict"] if k.endswith("blocks.0.attention.wo.weight"))
    changed["state_dict"][key] = changed["state_dict"][key] * 1.01
    torch.save(changed, tmp_path / "changed.ckpt")
    checkpoint["lora"]["base"] = str(tmp_path / "changed.ckpt")
    with pytest.raises(ValueError, match="quantizes to"):
        adapted_from_checkpoint(checkpoint)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft calls transformers
def test_exported_adapters_load_in_peft_on_the_full_precision_base(short_run: Path, base: Path, tmp_path: Path,
                                                                  capsys) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    llmkit(["export", f"ckpt={base}", f"out={tmp_path / 'base_hf'}"])  # the full-precision base
    llmkit(["export", f"ckpt={short_run}", f"out={tmp_path / 'adapter'}", "adapter=true", f"base={tmp_path / 'base_hf'}"])
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf")
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 11, 2]])
    with torch.no_grad():
        full_base = hf_base(ids).logits
        theirs = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()(ids).logits
        ours = load_checkpoint(short_run).model(ids)  # adapters merged into the dequantized base
        dequantized = adapted_from_checkpoint(torch.load(short_run, weights_only=True))
        from llmkit.adapters.lora import lora_disabled

        with lora_disabled(dequantized):
            quantization = (dequantized(ids) - full_base).abs().max()  # what NF4 alone does to these logits
    # peft runs the same adapters over the full-precision weights, ours over the NF4 ones: the two differ by
    # the quantization's effect on the logits, which the base alone shows. The tolerance: that effect, with
    # room for the adapters' small changes to how it propagates (x2). The same adapters on the wrong rows, a
    # wrong scale or a missing piece move logits by the adapters' whole effect, far more (the unit test
    # tests/adapters/test_qlora.py checks exact agreement on the dequantized base's export).
    assert quantization > 1e-3
    difference = (theirs - ours).abs().max()
    assert difference <= 2 * quantization, (difference, quantization)
    assert (theirs - full_base).abs().max() > 4 * quantization  # the adapters' effect is larger than the tolerance
    llmkit(["generate", f"ckpt={short_run}", "prompt=12_is", "max_new_tokens=3", "temperature=0"])
    assert "12_is" in capsys.readouterr().out


@pytest.mark.extended
def test_qlora_sft_answers_as_well_as_lora_on_the_same_task_and_steps(base: Path, tmp_path: Path) -> None:
    held_out = parity_records(64, seed=1)
    accuracy = {}
    for finetune in ("lora", "qlora"):
        tuned = load_checkpoint(sft(tmp_path / finetune, base, finetune, 60))
        accuracy[finetune] = answer_accuracy(tuned.model, tuned.tokenizer, held_out)
    before = load_checkpoint(base)
    assert accuracy["lora"] > answer_accuracy(before.model, before.tokenizer, held_out) + 0.3, accuracy  # it learned
    print(f"held-out answer accuracy: {accuracy}")  # pytest -rP shows it
    assert abs(accuracy["qlora"] - accuracy["lora"]) <= 0.05, accuracy


@pytest.mark.extended
def test_sigkill_mid_qlora_sft_then_resume_auto_gives_the_uninterrupted_adapters(tmp_path: Path,
                                                                                 tiny_checkpoint: Path) -> None:
    base = longer_context(tiny_checkpoint, tmp_path / "base.ckpt", 64)
    data = write_jsonl(tmp_path / "parity.jsonl", parity_records(100, seed=0))
    killed_then_resumed(tmp_path, base, "task=sft", "data=sft", f"data.path={data}", "data.batch_size=4",
                        "finetune=qlora")


@pytest.mark.extended
@pytest.mark.parametrize(("task", "metric", "extra"), [
    ("dpo", "val/rewards/accuracies", ["task.reference=lora", "task.beta=0.5"]),  # the quantized base as reference
    ("reward", "val/accuracy", []),
])
def test_qlora_trains_the_pair_objectives(base: Path, tmp_path: Path, task: str, metric: str, extra: list[str]) -> None:
    """Both learn to prefer the chosen reply (0.5 is chance) and save adapter checkpoints."""
    from tests.posttrain.test_dpo import train_pairs, val_metrics

    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records(200, seed=0))
    run = train_pairs(tmp_path / task, base, data, task, "finetune=qlora", "optim.lr=1e-2", "trainer.max_steps=30",
                      "trainer.val_check_interval=30", *extra)
    assert float(val_metrics(run)[-1][metric]) > 0.9
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert "quant" in checkpoint["lora"]
    assert all(k.endswith(("lora_A", "lora_B")) or k.startswith("objective.") for k in checkpoint["state_dict"])

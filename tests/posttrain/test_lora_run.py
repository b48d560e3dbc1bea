"""`llmkit train task=sft finetune=lora`: adapter-only checkpoints that inference, export and PEFT read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmkit.checkpoint import load_checkpoint
from llmkit.cli import main as llmkit
from tests.posttrain.helpers import longer_context, parity_records, write_jsonl
from tests.posttrain.test_sft import RUN, answer_accuracy


@pytest.fixture(scope="module")
def base(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return longer_context(tiny_checkpoint, tmp_path_factory.mktemp("base") / "base.ckpt", 64)


@pytest.fixture(scope="module")
def lora_run(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("lora")
    data = write_jsonl(tmp / "parity.jsonl", parity_records(400, seed=0))
    run = tmp / "run"
    llmkit(["train", f"hydra.run.dir={run}", f"paths.data_dir={tmp / 'cache'}", "task=sft", f"init_from={base}",
            "data=sft", f"data.path={data}", "data.template=raw", "finetune=lora", "finetune.r=8",
            "finetune.targets=[blocks.*.attention.wqkv,blocks.*.attention.wo,blocks.*.ffn.w_up]", "optim.lr=1e-2",
            "trainer.max_steps=60", "trainer.val_check_interval=30", *RUN[:-2], "preflight=off"])
    return run


def test_lora_checkpoint_holds_only_the_adapters_and_names_its_base(lora_run: Path, base: Path) -> None:
    checkpoint = torch.load(lora_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["lora"]["base"] == str(base) and checkpoint["lora"]["config"]["r"] == 8
    assert checkpoint["state_dict"] and all(k.endswith(("lora_A", "lora_B")) for k in checkpoint["state_dict"])
    adapters = sum(v.numel() for v in checkpoint["state_dict"].values())
    assert adapters < 0.2 * load_checkpoint(base).model.num_params()


def test_lora_sft_learns_and_loads_merged_for_inference(lora_run: Path, base: Path, capsys) -> None:
    held_out = parity_records(64, seed=1)
    tuned, before = load_checkpoint(lora_run / "checkpoints" / "last.ckpt"), load_checkpoint(base)
    assert not any("lora" in name for name in tuned.model.state_dict())  # merged into plain Linear layers
    gain = answer_accuracy(tuned.model, tuned.tokenizer, held_out) - answer_accuracy(before.model, before.tokenizer, held_out)
    assert gain > 0.3, gain
    llmkit(["generate", f"ckpt={lora_run / 'checkpoints' / 'last.ckpt'}", "prompt=12_is", "max_new_tokens=3",
            "temperature=0"])
    assert capsys.readouterr().out.startswith("12_is")


def test_export_merged_model_and_peft_adapter_that_peft_loads_onto_the_base(lora_run: Path, base: Path,
                                                                           tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    ckpt = lora_run / "checkpoints" / "last.ckpt"
    llmkit(["export", f"ckpt={base}", f"out={tmp_path / 'base_hf'}"])
    llmkit(["export", f"ckpt={ckpt}", f"out={tmp_path / 'adapter'}", "adapter=true", f"base={tmp_path / 'base_hf'}"])
    llmkit(["export", f"ckpt={ckpt}", f"out={tmp_path / 'merged_hf'}"])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf")
    with_adapter = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf").eval()
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    ours = load_checkpoint(ckpt).model(ids)
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, ours, rtol=1e-4, atol=1e-4)  # fp32, other op order
        torch.testing.assert_close(merged(ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_a_lora_pattern_matching_nothing_lists_the_module_names(base: Path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "parity.jsonl", parity_records(20, seed=0))
    with pytest.raises(SystemExit):
        llmkit(["train", f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'cache'}", "task=sft",
                f"init_from={base}", "data=sft", f"data.path={data}", "data.template=raw", "finetune=lora",
                "finetune.targets=[blocks.*.attn.qkv]", "trainer.max_steps=1", *RUN])
    err = capsys.readouterr().err
    assert "blocks.*.attn.qkv" in err and "blocks.*.attention.wqkv" in err

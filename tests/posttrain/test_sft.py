"""`llmkit train task=sft`: from a base checkpoint, on generated data, end to end through the Hydra app."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.checkpoint import load_checkpoint
from llmkit.cli import main as llmkit
from llmkit.posttrain.objectives import SupervisedFineTuning
from llmkit.posttrain.packing import pack
from llmkit.text.chat import render_chat
from tests.posttrain.helpers import longer_context, parity_records, write_jsonl

# Adam's update m / sqrt(v) is scale-free: fp32 gradients summed in another order (relative error ~1e-7)
# move a weight by ~1e-7 of a step, except where a gradient is as small as its own rounding error, which
# can move it by a whole step (lr 3e-3). Measured: at most 4.2e-6 after 5 steps. A wrong weighting of the
# micro-batches changes the gradient itself by tens of percent: differences of the order of a step.
ADAM_ATOL = 1e-2 * 3e-3

RUN = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "sample.max_new_tokens=4",
       "scheduler.warmup_steps=0", "optim.lr=3e-3", "preflight=off"]


@pytest.fixture(scope="module")
def base(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return longer_context(tiny_checkpoint, tmp_path_factory.mktemp("base") / "base.ckpt", 64)


def sft(run: Path, base: Path, data: Path, *overrides: str) -> Path:
    llmkit(["train", f"hydra.run.dir={run}", f"paths.data_dir={run.parent / 'cache'}", "task=sft",
            f"init_from={base}", "data=sft", f"data.path={data}", "data.template=raw", *RUN, *overrides])
    return run


def answer_accuracy(model: torch.nn.Module, tokenizer, records: list[dict]) -> float:
    """The fraction of answer tokens (the reply and its EOS) the model predicts, teacher-forced."""
    samples = [render_chat([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
                           tokenizer, "raw") for r in records]
    rows = pack(samples, 64, packing=False, pad_id=0)
    batch = {name: torch.from_numpy(getattr(rows, name)) for name in ("ids", "labels", "positions", "segments")}
    with torch.no_grad():
        values = SupervisedFineTuning().validation(model.eval(), batch)["accuracy"]
    return float(values[0] / values[1])


def test_sft_raises_answer_accuracy_on_held_out_prompts_well_above_the_base(base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "parity.jsonl", parity_records(400, seed=0))
    run = sft(tmp_path / "run", base, data, "trainer.max_steps=60", "trainer.val_check_interval=30")
    held_out = parity_records(64, seed=1)
    loaded = load_checkpoint(run / "checkpoints" / "last.ckpt")
    before = load_checkpoint(base)
    base_accuracy = answer_accuracy(before.model, before.tokenizer, held_out)
    tuned_accuracy = answer_accuracy(loaded.model, loaded.tokenizer, held_out)
    assert tuned_accuracy > base_accuracy + 0.4 and tuned_accuracy > 0.75, (base_accuracy, tuned_accuracy)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["counts"]["kept"] == 400 and summary["data"]["counts"]["dropped_no_scored_tokens"] == 0
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["chat_template"] == "raw"  # llmkit serve renders chat requests with it


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_micro_batch_8_equals_micro_batch_2_times_accumulation_4(base: Path, tmp_path: Path) -> None:
    """The loss is the token mean over the whole optimizer step: packed rows hold different numbers of
    scored tokens, so a mean per micro-batch would weigh them differently."""
    data = write_jsonl(tmp_path / "parity.jsonl", parity_records(120, seed=0))
    steps = ["trainer.max_steps=5", "trainer.val_check_interval=5", "data.val_fraction=0", "data.seq_len=32"]
    whole = _weights(sft(tmp_path / "b8", base, data, *steps, "data.batch_size=8"))
    split = _weights(sft(tmp_path / "b2x4", base, data, *steps, "data.batch_size=2", "trainer.accumulate_grad_batches=4"))
    rows = [np.load(p)["labels"] for p in (tmp_path / "cache").glob("sft-*/train.npz")][0]
    assert len(set((rows != -100).sum(axis=1).tolist())) > 1  # rows differ in scored tokens: the test can fail
    for name, value in whole.items():
        assert ((split[name] - value).abs().max() <= ADAM_ATOL), name


def test_records_missing_a_field_name_the_file_and_line(base: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1 is", "completion": " odd"}\n{"prompt": "2 is"}\n')
    with pytest.raises(SystemExit):
        sft(tmp_path / "run", base, data, "trainer.max_steps=1")
    assert "bad.jsonl, line 2: missing field 'completion'" in capsys.readouterr().err
    assert not list((tmp_path / "cache").glob("sft-*/manifest.json"))  # nothing half-prepared looks complete


def test_init_from_with_another_tokenizer_than_the_data_is_refused(base: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        llmkit(["train", f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'cache'}", f"init_from={base}",
                "data.max_bytes=20000", "data.tokenizer=char", "data.seq_len=32", "trainer.max_steps=1", *RUN])
    assert "was trained with another tokenizer" in capsys.readouterr().err


def char_base(path: Path) -> Path:
    """A small random model whose char tokenizer (with an EOS) lacks chatml's tokens."""
    from llmkit.model import ModelConfig, Transformer
    from llmkit.text.tokenizer import CharTokenizer

    tokenizer = CharTokenizer("".join(sorted(set("0123456789 isevnodd"))), ["</s>"])
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
    model = Transformer(cfg)
    torch.save({"model_config": cfg.to_dict(), "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "LMDataModule": {"tokenizer": tokenizer.to_state()}}, path)
    return path


def test_chatml_tokens_missing_from_the_base_vocabulary_are_refused_or_added_with_resized_embeddings(
    tmp_path: Path, capsys
) -> None:
    base = char_base(tmp_path / "char.ckpt")
    data = write_jsonl(tmp_path / "parity.jsonl", parity_records(40, seed=0))
    chatml = ["task=sft", f"init_from={base}", "data=sft", f"data.path={data}", "data.template=chatml",
              "trainer.max_steps=2", "trainer.val_check_interval=2", *RUN]
    with pytest.raises(SystemExit):
        llmkit(["train", f"hydra.run.dir={tmp_path / 'refused'}", f"paths.data_dir={tmp_path / 'cache'}", *chatml])
    assert "template tokens missing from the vocabulary" in capsys.readouterr().err
    run = tmp_path / "added"
    llmkit(["train", f"hydra.run.dir={run}", f"paths.data_dir={tmp_path / 'cache'}", *chatml,
            "data.add_template_tokens=true"])
    tuned, before = load_checkpoint(run / "checkpoints" / "last.ckpt"), load_checkpoint(base)
    assert tuned.model.cfg.vocab_size == before.model.cfg.vocab_size + 2
    assert tuned.tokenizer.token_to_id("<|im_start|>") == before.model.cfg.vocab_size
    assert tuned.model.tok_emb.weight.shape[0] == tuned.tokenizer.vocab_size

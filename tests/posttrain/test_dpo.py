"""DPO and the reward model: the objectives against their references, and `llmkit train task=dpo|reward`."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.adapters.lora import LoraConfig, apply_lora
from llmkit.checkpoint import load_checkpoint
from llmkit.cli import main as llmkit
from llmkit.posttrain.objectives import DirectPreference, RewardModel, compute_reference
from llmkit.posttrain.packing import pack
from llmkit.text.chat import render_chat
from tests.posttrain.helpers import longer_context, preference_records, write_jsonl
from tests.posttrain.test_sft import ADAM_ATOL, RUN

LN2 = math.log(2)


@pytest.fixture(scope="module")
def base(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return longer_context(tiny_checkpoint, tmp_path_factory.mktemp("base") / "base.ckpt", 64)


def pair_batch(tokenizer, records: list[dict]) -> dict[str, torch.Tensor]:
    """chosen_* and rejected_* rows as the preference datamodule makes them."""
    batch = {}
    for side in ("chosen", "rejected"):
        samples = [render_chat([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[side]}],
                               tokenizer, "raw", "last") for r in records]
        rows = pack(samples, 64, packing=False, pad_id=0)
        batch[f"{side}_ids"], batch[f"{side}_labels"] = torch.from_numpy(rows.ids), torch.from_numpy(rows.labels)
    return batch


@pytest.mark.parametrize("reference", ["copy", "lora", "precomputed"])
def test_dpo_loss_is_ln2_at_init_and_the_reference_gets_no_gradient(base: Path, reference: str) -> None:
    loaded = load_checkpoint(base)
    model = loaded.model.train()
    batch = pair_batch(loaded.tokenizer, preference_records(6, seed=0))
    objective = DirectPreference(reference=reference)
    objective.attach(model, str(base), "lora" if reference == "lora" else "full")
    if reference == "lora":
        apply_lora(model, LoraConfig())
    if reference == "precomputed":
        arrays = {k: v.numpy() for k, v in batch.items()}
        batch.update({k: torch.from_numpy(v) for k, v in compute_reference(copy.deepcopy(model), arrays, "cpu").items()})
    model.train()
    out = objective.training_loss(model, batch, scale=1.0)
    assert out.loss.item() == pytest.approx(LN2, abs=1e-5)  # fp32 log-probs of two forwards of the same weights
    out.loss.backward()
    frozen = objective._copy.model.parameters() if reference == "copy" else []
    assert all(p.grad is None for p in frozen)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_precomputed_reference_equals_the_online_one(base: Path) -> None:
    loaded = load_checkpoint(base)
    batch = pair_batch(loaded.tokenizer, preference_records(5, seed=3))
    online = DirectPreference(reference="copy")
    online.attach(loaded.model, str(base), "full")
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    live = online.reference_logprobs(loaded.model, batch, ids, labels)
    stored = compute_reference(loaded.model, {k: v.numpy() for k, v in batch.items()}, "cpu", batch_size=2)
    saved = torch.from_numpy(np.concatenate([stored["ref_chosen"], stored["ref_rejected"]]))
    torch.testing.assert_close(saved, live, rtol=0, atol=1e-4)  # sums of ~10 fp32 log-probs, other batch shapes


def test_a_zero_reward_head_gives_ln2(base: Path) -> None:
    loaded = load_checkpoint(base)
    objective = RewardModel()
    objective.attach(loaded.model, str(base), "full")
    out = objective.training_loss(loaded.model, pair_batch(loaded.tokenizer, preference_records(4, seed=0)), 1.0)
    assert out.loss.item() == pytest.approx(LN2, abs=1e-7)


def test_the_reward_margin_enters_the_loss(base: Path) -> None:
    loaded = load_checkpoint(base)
    objective = RewardModel(margin=True)
    objective.attach(loaded.model, str(base), "full")
    batch = pair_batch(loaded.tokenizer, preference_records(4, seed=0))
    batch["margin"] = torch.full((4,), 1.0)
    out = objective.training_loss(loaded.model, batch, 1.0)
    assert out.loss.item() == pytest.approx(math.log(1 + math.e), abs=1e-6)  # -log sigmoid(0 - 1) with a zero head


def val_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get("val/loss")]


def train_pairs(run: Path, base: Path, data: Path, task: str, *overrides: str) -> Path:
    llmkit(["train", f"hydra.run.dir={run}", f"paths.data_dir={run.parent / 'cache'}", f"task={task}",
            f"init_from={base}", "data=preference", f"data.path={data}", "data.template=raw", *RUN, *overrides])
    return run


def test_dpo_reaches_reward_accuracy_over_0_9_with_positive_margins(base: Path, tmp_path: Path) -> None:
    same = {"prompt": "1 ok?", "chosen": " yes", "rejected": " yes"}  # no preference: warned, dropped, counted
    data = write_jsonl(tmp_path / "pairs.jsonl", [*preference_records(200, seed=0), same])
    with pytest.warns(UserWarning, match="chosen equals rejected"):
        run = train_pairs(tmp_path / "dpo", base, data, "dpo", "trainer.max_steps=30", "trainer.val_check_interval=30",
                          "task.beta=0.5", "optim.lr=1e-3")
    last = val_metrics(run)[-1]
    assert float(last["val/rewards/accuracies"]) > 0.9 and float(last["val/rewards/margins"]) > 0, last
    counts = json.loads((run / "summary.json").read_text())["data"]["counts"]
    assert counts["identical_chosen_rejected"] == 1 and counts["kept"] == 200


def test_reward_model_learns_to_rank_the_chosen_reply(base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records(200, seed=0))
    run = train_pairs(tmp_path / "reward", base, data, "reward", "trainer.max_steps=30", "trainer.val_check_interval=30")
    last = val_metrics(run)[-1]
    assert float(last["val/accuracy"]) > 0.9 and float(last["val/loss"]) < LN2 - 0.1, last
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert "objective.head.weight" in checkpoint["state_dict"]
    held_out = write_jsonl(tmp_path / "held_out.jsonl", preference_records(20, seed=5))
    llmkit(["score", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"pairs={held_out}"])
    scores = json.loads((tmp_path / "held_out.jsonl.scores.json").read_text())
    assert scores["pairs"] == 20 and scores["accuracy"] > 0.9 and scores["mean_margin"] > 0


@pytest.mark.extended  # the SFT equivalence (tests/posttrain/test_sft.py) stays in the default run
def test_dpo_micro_batch_8_equals_micro_batch_2_times_accumulation_4(base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records(64, seed=0))
    steps = ["trainer.max_steps=5", "trainer.val_check_interval=5", "data.val_fraction=0", "data.seq_len=32"]
    whole = train_pairs(tmp_path / "b8", base, data, "dpo", *steps, "data.batch_size=8")
    split = train_pairs(tmp_path / "b2x4", base, data, "dpo", *steps, "data.batch_size=2",
                        "trainer.accumulate_grad_batches=4")
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name, value in a.items():
        assert ((b[name] - value).abs().max() <= ADAM_ATOL), name

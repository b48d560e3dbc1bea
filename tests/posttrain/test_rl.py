"""Online RL (`task=grpo | rloo`): the rollout over the batched decoder, the first update's ratio, the reference,
bad options, `llmkit train` end to end, and (extended) learning a verifiable task and exact resume after SIGKILL."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmkit.checkpoint import load_checkpoint
from llmkit.cli import main as llmkit
from llmkit.generation.decode import CachedDecoder
from llmkit.posttrain.prompts import PromptRows
from llmkit.posttrain.rewards import Completions, Reward
from llmkit.posttrain.rl import GRPO, RLOO, Rollout
from llmkit.posttrain.rl_losses import token_logprobs
from llmkit.posttrain.rl_ppo import PPO

ANSWERS = {"1": "a", "2": "b", "3": "c"}  # the task: answer the digit's letter; a random base rarely does (1 in 12)
RUN = ["trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "sample.max_new_tokens=2",
       "scheduler.warmup_steps=0", "preflight=off", "data.template=raw", "reward=exact_match"]


def char_base(path: Path, seed: int = 0) -> Path:
    """A small random model over a 12-token char vocabulary (with an EOS)."""
    from llmkit.model import ModelConfig, Transformer
    from llmkit.text.tokenizer import CharTokenizer

    torch.manual_seed(seed)
    tokenizer = CharTokenizer("abcxyz123=", ["</s>"])
    # untied: a LoRA on the head can then grow the logits (tied to these small embeddings, behind the final
    # norm, no adapter can make any token much likelier than at init)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=16,
                      tie_embeddings=False)
    model = Transformer(cfg)
    torch.save({"model_config": cfg.to_dict(), "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "LMDataModule": {"tokenizer": tokenizer.to_state()}}, path)
    return path


def prompts_file(path: Path, copies: int = 4, extra: list[dict] | None = None, answers: dict = ANSWERS) -> Path:
    records = [{"prompt": f"{digit}=", "answer": letter} for digit, letter in answers.items()] * copies
    path.write_text("".join(json.dumps(r) + "\n" for r in [*records, *(extra or [])]))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return char_base(tmp_path_factory.mktemp("rl") / "base.ckpt")


def expected_reward(checkpoint: Path, answers: dict = ANSWERS) -> float:
    """The policy's exact mean reward at temperature 1 with one-token answers: mean p(answer | prompt)."""
    loaded = load_checkpoint(checkpoint)
    tokenizer, model = loaded.tokenizer, loaded.model.eval()
    with torch.no_grad():
        probs = [model(torch.tensor([tokenizer.encode(f"{d}=")]))[0, -1].softmax(-1)[tokenizer.encode(a)[0]]
                 for d, a in answers.items()]
    return float(torch.stack(probs).mean())


def objective(cls=GRPO, base: Path | None = None, **options) -> tuple:
    loaded = load_checkpoint(base)
    obj = cls(reward={"name": "exact_match"}, **{"num_generations": 4, "max_completion_length": 3, **options})
    obj.attach(loaded.model, str(base), "full")
    obj.tokenizer, obj.stop_id, obj.pad_id = loaded.tokenizer, loaded.tokenizer.eos_id, 0
    return obj, loaded.model.train(), loaded.tokenizer


def prompt_batch(tokenizer, step: int = 0, iteration: int = 0) -> dict:
    records = [{"prompt": f"{d}=", "answer": a} for d, a in ANSWERS.items()]
    rows = PromptRows([tokenizer.encode(r["prompt"]) for r in records], [r["prompt"] for r in records], records)
    return {"rows": rows, "step": step, "micro": 0, "iteration": iteration, "seed": 7, "rank": 0}


class Counting(Reward):
    """Completion i scores i: unequal rewards in every group, so no advantage is 0."""

    def __call__(self, batch: Completions) -> list[float]:
        return [float(i) for i in range(len(batch.texts))]


# ---- the rollout and the update -------------------------------------------------------------------
def test_the_rollout_is_one_batch_of_every_prompt_times_g_and_is_seeded(base: Path, monkeypatch) -> None:
    obj, model, tokenizer = objective(base=base)
    prefills = []
    original = CachedDecoder.prefill
    monkeypatch.setattr(CachedDecoder, "prefill", lambda self, c: prefills.append(len(c)) or original(self, c))
    batch = prompt_batch(tokenizer)
    rollout, logs = obj.rollout(model, batch)
    assert prefills == [3]  # 3 prompts prefilled once, each for its 4 rows: one batch through the KV-cache decoder
    assert rollout.ids.shape[0] == 12 and rollout.rewards.shape == (12,)
    for row in range(12):  # groups are consecutive rows of the same prompt; labels are the completion tokens
        prompt = batch["rows"].tokens[row // 4]
        assert rollout.ids[row, : len(prompt)].tolist() == prompt
        scored = rollout.labels[row][rollout.labels[row] != -100]
        assert scored.tolist() == rollout.ids[row, len(prompt) : len(prompt) + len(scored)].tolist()
        assert 1 <= len(scored) <= 3
    assert 0 <= logs["completions/truncated"] <= 1 and logs["completions/max_length"] <= 3
    again, _ = obj.rollout(model, batch)
    assert torch.equal(again.ids, rollout.ids)  # the same (seed, step, slot, rank): the same samples
    other, _ = obj.rollout(model, {**batch, "step": 1})
    assert not torch.equal(other.ids, rollout.ids)


def test_the_first_update_of_a_rollout_has_ratio_one_and_later_ones_use_its_log_probs(base: Path) -> None:
    # epsilon 1e-12: any ratio other than exactly 1 (with a nonzero advantage) would be clipped
    obj, model, tokenizer = objective(base=base, epsilon=1e-12, num_iterations=2, loss_type="bnpo")
    obj.reward = Counting()
    batch = prompt_batch(tokenizer)
    out = obj.training_loss(model, batch, scale=1.0)
    assert out.logs["clip_ratio/region_mean"] == 0
    kept = obj._rollouts[0]
    assert kept.old_logps is not None and not kept.old_logps.requires_grad
    out.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad.sign() * 1e-2  # an update moves the policy
    second = obj.training_loss(model, {**batch, "iteration": 1}, scale=1.0)  # reuses the kept rollout
    assert second.logs["clip_ratio/region_mean"] > 0
    assert "reward" not in second.logs  # no new rollout


def test_dapo_divides_by_the_completion_tokens_of_the_whole_step(base: Path) -> None:
    """Two accumulation slots (scale 2; Lightning halves each loss): the step's gradient is TRL's dapo over both
    rollouts together, the sum of their token losses over all their tokens, not the mean of two slot means."""
    from llmkit.posttrain.rl_losses import grpo_loss

    obj, model, tokenizer = objective(base=base, num_iterations=2)  # kept rollouts, to recompute the loss below
    obj.reward = Counting()
    for micro in (0, 1):
        batch = {**prompt_batch(tokenizer), "micro": micro, "seed": 10}  # a seed whose slots differ in length
        (obj.training_loss(model, batch, scale=2.0).loss / 2).backward()
    obj.before_optimizer_step(model)
    got = [p.grad.clone() for p in model.parameters()]
    rollouts = [obj._rollouts[0], obj._rollouts[1]]
    counts = [float(r.mask.sum()) for r in rollouts]
    assert counts[0] != counts[1]  # otherwise the mean of slot means would be the same thing

    def gradients(normaliser) -> list[torch.Tensor]:
        model.zero_grad()
        for r, count in zip(rollouts, counts, strict=True):
            logps = token_logprobs(model(r.ids), r.labels)
            loss, _ = grpo_loss(logps, r.old_logps, r.advantages, r.mask, loss_type="dapo",
                                num_items=torch.tensor(normaliser(count)))
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    want = gradients(lambda count: sum(counts))
    slot_means = gradients(lambda count: 2 * count)
    for g, w in zip(got, want, strict=True):  # fp32 sums in another order: ~1e-7 relative
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(w, s, rtol=1e-3) for w, s in zip(want, slot_means, strict=True))


def test_beta_zero_builds_no_reference_and_the_lora_reference_is_the_base(base: Path) -> None:
    from llmkit.adapters.lora import LoraConfig, apply_lora

    obj, _, _ = objective(base=base, beta=0.0)
    assert obj._copy is None and not obj._use_lora_reference
    copied, _, _ = objective(base=base, beta=0.1)
    assert copied._copy.model is not None and not any(p.requires_grad for p in copied._copy.model.parameters())
    loaded = load_checkpoint(base)
    lora = GRPO(reward={"name": "exact_match"}, num_generations=2, beta=0.1)
    lora.attach(loaded.model, str(base), "lora")
    assert lora._copy is None and lora._use_lora_reference
    apply_lora(loaded.model, LoraConfig(r=2))
    for p in loaded.model.parameters():  # adapters that change the outputs
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    ids, labels = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[-100, 3, 4, -100]])
    want = token_logprobs(load_checkpoint(base).model(ids), labels)
    torch.testing.assert_close(lora._reference_logps(loaded.model, ids, labels), want, rtol=0, atol=1e-6)
    assert not torch.allclose(token_logprobs(loaded.model(ids), labels), want, atol=1e-3)


def test_ppo_puts_the_score_on_the_last_token_and_the_kl_on_every_token(base: Path) -> None:
    from llmkit.posttrain.rl_ppo import last_token_positions

    obj, model, tokenizer = objective(PPO, base=base, beta=0.1, lam=0.5)
    obj.reward = Counting()
    batch = prompt_batch(tokenizer)
    rollout, logs = obj.rollout(model, batch)
    assert logs["kl"] == 0  # the policy is still the reference: k1 = log pi - log ref = 0
    mask = rollout.mask
    last = last_token_positions(mask)
    rows = torch.arange(len(last))
    # the value head starts at zero: the return of token t is lam^(steps to the end) x the score, gamma 1
    torch.testing.assert_close(rollout.returns[rows, last], rollout.rewards.float(), rtol=0, atol=0)
    before_last = (mask.sum(-1) > 1).nonzero().flatten()
    torch.testing.assert_close(rollout.returns[before_last, last[before_last] - 1],
                               0.5 * rollout.rewards[before_last].float(), rtol=0, atol=1e-7)
    out = obj.training_loss(model, batch, scale=1.0)
    out.loss.backward()
    assert obj.value_head.weight.grad is not None and "value_loss" in out.logs


def test_bad_options_are_refused() -> None:
    for cls in (GRPO, RLOO):
        with pytest.raises(ValueError, match="num_generations=1 leaves no group"):
            cls(num_generations=1)
    with pytest.raises(KeyError, match="bnpo, dapo, dr_grpo, grpo"):
        GRPO(loss_type="ppo")
    with pytest.raises(ValueError, match="group, batch, none"):
        GRPO(scale_rewards="token")
    with pytest.raises(ValueError, match="kl_in=reward"):
        RLOO(kl_in="loss")
    with pytest.raises(ValueError, match="temperature"):
        GRPO(temperature=0)
    PPO(num_generations=1)  # PPO compares with its value head, not with a group


def test_a_kept_rollout_survives_the_checkpoint(base: Path) -> None:
    obj, model, tokenizer = objective(base=base, num_iterations=2)
    obj.training_loss(model, prompt_batch(tokenizer), scale=1.0)
    state = obj.state_dict()
    fresh, _, _ = objective(base=base, num_iterations=2)
    fresh.load_state_dict(state)
    kept, restored = obj._rollouts[0], fresh._rollouts[0]
    assert isinstance(restored, Rollout)
    for name in ("ids", "labels", "rewards", "advantages", "old_logps"):
        assert torch.equal(getattr(kept, name), getattr(restored, name)), name


# ---- `llmkit train` ---------------------------------------------------------------------------------
def train(run: Path, base: Path, data: Path, *overrides: str) -> Path:
    llmkit(["train", f"hydra.run.dir={run}", f"paths.data_dir={run.parent / 'cache'}", f"init_from={base}",
            "data=prompts", f"data.path={data}", *RUN, *overrides])
    return run


def metrics(run: Path) -> dict[str, list[float]]:
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    return {key: [float(r[key]) for r in rows if r.get(key)] for key in rows[0]}


def test_llmkit_train_grpo_logs_the_rollout_and_counts_dropped_prompts(base: Path, tmp_path: Path) -> None:
    too_long = {"prompt": "123123123123123=", "answer": "a"}  # 16 tokens: no room for a completion in 16
    data = prompts_file(tmp_path / "p.jsonl", extra=[too_long])
    run = train(tmp_path / "run", base, data, "task=grpo", "task.beta=0.04", "task.num_generations=4",
                "task.max_completion_length=2", "data.batch_size=3", "trainer.max_steps=3", "task.log_completions=2")
    logged = metrics(run)
    for key in ("reward", "reward_std", "kl", "entropy", "clip_ratio/region_mean", "completions/mean_length",
                "completions/max_length", "completions/truncated", "time/rollout_s", "time/update_s"):
        assert logged[f"train/{key}"], key
    assert all(v == 0 for v in logged["train/clip_ratio/region_mean"])  # num_iterations=1: every update is a first
    table = list(csv.DictReader((run / "completions.csv").open()))
    assert [int(r["step"]) for r in table] == [0] * 12 + [2] * 12  # every 2 steps: 3 prompts x 4 completions
    assert {r["prompt"] for r in table} == {"1=", "2=", "3="} and {r["reward"] for r in table} <= {"0.0", "1.0"}
    counts = json.loads((run / "summary.json").read_text())["data"]["counts"]
    assert counts["dropped_too_long"] == 1 and counts["prompts"] == 12


def test_validation_scores_held_out_prompts_and_counts_each_once(base: Path) -> None:
    from llmkit.posttrain.prompts import PromptWindows, prompt_arrays

    arrays = prompt_arrays([([1 + i, 10], {"prompt": str(i)}) for i in range(5)])
    ranks = [PromptWindows(arrays, 2, rank, 2, seed=7) for rank in (0, 1)]
    assert [len(w) for w in ranks] == [2, 2]  # 3 rows each (rank 1 repeats one): the same batches on every rank
    seen = [(p, c) for w in ranks for i in range(len(w)) for p, c in zip(w[i]["rows"].prompts, w[i]["counted"], strict=True)]
    assert sorted(p for p, c in seen if c) == ["0", "1", "2", "3", "4"] and sum(not c for _, c in seen) == 1
    obj, model, tokenizer = objective(base=base, num_generations=2)
    obj.reward = Counting()  # completion i scores i
    batch = {**prompt_batch(tokenizer), "counted": [True, False, True], "val_batch": 0}
    got = obj.validation(model, batch)
    total, count = got["reward"]
    assert (float(total), int(count)) == (0 + 1 + 4 + 5, 4)  # rows of prompts 0 and 2, not of the repeated one
    assert int(got["completions/mean_length"][1]) == 4
    again = obj.validation(model, batch)  # every validation draws the same numbers
    assert torch.equal(again["completions/mean_length"][0], got["completions/mean_length"][0])


def test_held_out_prompts_log_val_rewards_and_completions_reach_a_wandb_table(base: Path, tmp_path: Path,
                                                                               monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # offline: llmkit's wandb config without a key
    monkeypatch.setenv("WANDB_SILENT", "true")
    records = [{"prompt": f"{d}=", "answer": a, "id": i} for i in range(8) for d, a in ANSWERS.items()]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = train(tmp_path / "run", base, data, "task=grpo", "data.val_fraction=0.25", "logger=[csv,wandb]",
                "task.log_completions=1", "task.num_generations=2", "task.max_completion_length=2", "data.batch_size=3",
                "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=0")
    counts = json.loads((run / "summary.json").read_text())["data"]["counts"]
    assert counts["val_samples"] > 0 and counts["train_samples"] + counts["val_samples"] == 24
    logged = metrics(run)
    assert len(logged["val/reward"]) == 1 and 0 <= logged["val/reward"][0] <= 1
    assert logged["val/rewards/exact_match:answer"] == logged["val/reward"]
    assert (run / "checkpoints" / "best-2.ckpt").exists()  # the checkpoint callback monitors val/reward
    assert 1 <= logged["val/completions/mean_length"][0] <= 2
    tables = sorted(run.glob("wandb/offline-run-*/files/media/table/completions_*.table.json"))
    assert len(tables) == 2  # one per step
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["step", "prompt", "completion", "reward"] and len(table["data"]) == 3 * 2
    csv_rows = [r for r in csv.DictReader((run / "completions.csv").open()) if r["step"] == "1"]
    assert [[r["prompt"], r["completion"]] for r in csv_rows] == [row[1:3] for row in table["data"]]


@pytest.mark.extended
def test_a_reward_function_that_raises_stops_the_run_naming_itself(base: Path, tmp_path: Path, monkeypatch,
                                                                    capsys) -> None:
    (tmp_path / "bad_reward.py").write_text("def reward(prompts, completions, **kw):\n    raise KeyError('oops')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit):
        train(tmp_path / "run", base, prompts_file(tmp_path / "p.jsonl"), "task=rloo", "reward=function",
              "reward.fn=bad_reward:reward", "task.max_completion_length=2", "trainer.max_steps=1")
    err = capsys.readouterr().err
    assert "reward bad_reward:reward raised KeyError" in err and '"answer"' in err


# ---- learning, and exact resume (extended) ----------------------------------------------------------
LEARN = ["task.num_generations=8", "task.max_completion_length=1", "data.batch_size=6", "optim.lr=1e-2",
         "scheduler=constant"]

# LoRA on every Linear (attention, MLP, head): on this 1-layer random model the digit reaches the answer's position
# only through the frozen random attention, which the adapters must reshape; lr 5e-3 learned the map within 40
# steps for three random bases (1e-2 sometimes collapsed onto one letter for every digit, a group of equal
# rewards with no advantage left to learn from)
LORA = ["optim.lr=5e-3", "finetune.alpha=64", "finetune.targets=[blocks.*.attention.*,blocks.*.ffn.*,head]"]


@pytest.mark.extended
@pytest.mark.parametrize(("task", "finetune", "steps", "extra"), [
    ("grpo", "full", 60, []),
    ("rloo", "full", 40, ["task.beta=0.0"]),
    ("ppo", "full", 40, ["task.beta=0.0"]),
    ("grpo", "lora", 60, LORA),
    ("rloo", "lora", 60, [*LORA, "task.beta=0.0"]),
])
def test_online_rl_learns_a_verifiable_task(base: Path, tmp_path: Path, task: str, finetune: str, steps: int,
                                            extra: list[str]) -> None:
    """Each digit has its own letter: the policy must learn the map, not one right word."""
    start = expected_reward(base)
    run = train(tmp_path / "run", base, prompts_file(tmp_path / "p.jsonl"), f"task={task}", f"finetune={finetune}",
                *LEARN, f"trainer.max_steps={steps}", *extra)
    final = expected_reward(run / "checkpoints" / "last.ckpt")
    assert start < 0.2 and final >= 0.9, (start, final, metrics(run)["train/reward"][-10:])


@pytest.mark.extended
def test_sigkill_mid_grpo_then_resume_auto_gives_the_uninterrupted_weights(base: Path, tmp_path: Path) -> None:
    """num_iterations=2 and a checkpoint at step 3: the resumed run's first update reuses the rollout kept in
    the checkpoint, and every later rollout samples what the uninterrupted run sampled. 12 steps: the kill
    lands steps before the end (with 6, a quiet machine once finished the run between two polls)."""
    from tests.posttrain.test_posttrain_resume import PERIODIC, ROOT, kill_when_written

    data = prompts_file(tmp_path / "p.jsonl")
    env = {**os.environ, "LLMKIT_DATA_DIR": str(tmp_path / "cache")}

    def command(run: Path) -> list[str]:
        return [sys.executable, "-m", "llmkit", "train", f"hydra.run.dir={run}", f"init_from={base}", "data=prompts",
                f"data.path={data}", *RUN, "task=grpo", *LEARN, "task.max_completion_length=3", "task.num_iterations=2",
                "task.beta=0.04", "data.batch_size=3", "trainer.max_steps=12", "resume=auto",
                *[o.replace("every_n_train_steps=10", "every_n_train_steps=3") for o in PERIODIC]]

    subprocess.run(command(tmp_path / "reference"), cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    run = tmp_path / "run"
    proc = subprocess.Popen(command(run), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run / "checkpoints" / "step-3.ckpt"
    kill_when_written(proc, checkpoint, run)
    assert torch.load(checkpoint, weights_only=True)["state_dict"]["objective._extra_state"]  # a kept rollout
    result = subprocess.run(command(run), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume=auto: resuming from" in result.stderr + result.stdout
    a = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    for name, tensor in a["state_dict"].items():
        if name.startswith("model."):
            assert torch.equal(tensor, b["state_dict"][name]), name


# ---- reward=model ------------------------------------------------------------------------------------
def reward_checkpoint(base: Path, out: Path, *, chars: str | None = None) -> Path:
    """`base` as a task=reward checkpoint: a random scalar head beside its weights (another tokenizer: `chars`)."""
    from llmkit.text.tokenizer import CharTokenizer

    state = torch.load(base, weights_only=True)
    state["state_dict"]["objective.head.weight"] = torch.randn(1, state["model_config"]["d_model"])
    state["hyper_parameters"] = {"task": {"name": "reward"}}
    if chars is not None:
        state["LMDataModule"] = {"tokenizer": CharTokenizer(chars, ["</s>"]).to_state()}
    torch.save(state, out)
    return out


def test_a_reward_model_scores_the_last_completion_token_and_bad_checkpoints_are_refused(base: Path,
                                                                                         tmp_path: Path) -> None:
    from llmkit.posttrain.rewards import REWARDS, score

    checkpoint = reward_checkpoint(base, tmp_path / "rm.ckpt")
    loaded = load_checkpoint(checkpoint)
    reward = REWARDS.build("model", ckpt=str(checkpoint), batch_size=2)
    reward.bind(loaded.tokenizer, "cpu")
    prompts, completions = [[1, 2], [3], [2, 2, 2]], [[4, 5, 11], [6], [7, 8]]
    got, _ = score(reward, Completions(["p"] * 3, ["c"] * 3, completions, [{}] * 3, prompts))
    head = loaded.checkpoint["state_dict"]["objective.head.weight"]
    with torch.no_grad():
        want = [float(loaded.model.features(torch.tensor([p + c]))[0, -1] @ head[0])
                for p, c in zip(prompts, completions, strict=True)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-5)  # fp32, padded vs not
    with pytest.raises(ValueError, match="not a reward model .*task=pretrain"):
        REWARDS.build("model", ckpt=str(base)).bind(loaded.tokenizer, "cpu")
    other = reward_checkpoint(base, tmp_path / "other.ckpt", chars="abcxyz123+")
    with pytest.raises(ValueError, match="tokenizer char .* the policy tokenizer char"):
        REWARDS.build("model", ckpt=str(other)).bind(loaded.tokenizer, "cpu")


@pytest.mark.extended
def test_grpo_against_a_reward_model_trained_here_raises_its_score_with_a_bounded_kl(base: Path, tmp_path: Path) -> None:
    pairs = [{"prompt": f"{d}=", "chosen": a, "rejected": r} for d, a in ANSWERS.items() for r in "xyz"] * 8
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    llmkit(["train", f"hydra.run.dir={tmp_path / 'rm'}", f"paths.data_dir={tmp_path / 'cache'}", f"init_from={base}",
            "task=reward", "data=preference", f"data.path={tmp_path / 'pairs.jsonl'}", "data.template=raw",
            "data.val_fraction=0", "optim.lr=1e-2", "trainer.max_steps=30", *RUN[:5]])
    run = train(tmp_path / "run", base, prompts_file(tmp_path / "p.jsonl"), "task=grpo", "reward=model",
                f"reward.ckpt={tmp_path / 'rm' / 'checkpoints' / 'last.ckpt'}", "task.beta=0.5",
                "task.num_generations=8", "task.max_completion_length=2", "data.batch_size=6", "optim.lr=1e-2",
                "scheduler=constant", "trainer.max_steps=30")
    logged = metrics(run)
    rewards, kl = logged["train/reward"], logged["train/kl"]
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert end > start + 0.5 * (max(rewards) - min(rewards)) / 2, (rewards[:5], rewards[-5:])
    assert max(kl) < 1.0, kl  # nats per token: the policy stays near the reference


def test_a_prompt_batch_goes_through_lightning_and_the_loader_untouched() -> None:
    # their collection walkers visit every element of a list (each token id of each prompt, every step); the
    # rows are one opaque object, which both pass on as it is
    import numpy as np
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from torch.utils.data._utils.collate import default_convert

    from llmkit.posttrain.prompts import prompt_arrays, prompt_batch

    arrays = prompt_arrays([([1, 2, 3], {"prompt": "a"}), ([4, 5], {"prompt": "b", "answer": "c"})])
    batch = prompt_batch(arrays, np.array([1, 0]))
    moved = move_data_to_device(default_convert(batch), torch.device("cpu"))
    assert moved["rows"] is batch["rows"]
    assert batch["rows"].tokens == [[4, 5], [1, 2, 3]] and batch["rows"].records[0] == {"prompt": "b", "answer": "c"}

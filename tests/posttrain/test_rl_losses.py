"""Online RL's losses and advantages: against TRL 1.16's own GRPOTrainer / RLOOTrainer code (run unbound on
stand-in trainers) on random float64 inputs, and advantages against values worked out by hand."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llmkit.posttrain.rl_losses import (
    GRPO_LOSSES,
    KL_ESTIMATORS,
    gae,
    group_advantages,
    grpo_loss,
    masked_whiten,
    ppo_loss,
    rloo_advantages,
    rloo_loss,
    sequence_kl,
)

TOL = {"rtol": 1e-10, "atol": 1e-10}  # float64 on both sides, the same operations up to summation order
NAN = float("nan")


def _inputs(seed: int = 0, n: int = 6, t: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t, dtype=torch.float64)
    mask[0, 3:] = 0  # completions of different lengths
    mask[2, 1:] = 0
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    return {"logps": old + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64),  # ratios beyond the clip
            "old": old, "ref": old + 0.2 * torch.randn(n, t, generator=g, dtype=torch.float64),
            "adv": torch.randn(n, generator=g, dtype=torch.float64), "mask": mask}


def _stand_in(logps: torch.Tensor, **fields) -> SimpleNamespace:
    """A trainer with what _compute_loss reads; its 'model' returns the given per-token log-probs."""
    accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  reduce=lambda x, reduction: x)
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=accelerator, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), **fields)


def _trl_inputs(x: dict[str, torch.Tensor], **extra) -> dict[str, torch.Tensor]:
    n, t = x["mask"].shape
    return {"prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
            "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": x["mask"],
            "advantages": x["adv"], **extra}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_trl(loss_type: str, beta: float) -> None:
    trl = pytest.importorskip("trl", minversion="1.16")
    from trl.trainer.grpo_trainer import GRPOTrainer

    x = _inputs(seed=1)
    num_items = x["mask"].sum() + 3.0  # dapo divides by the generation batch's tokens: more than these
    trainer = _stand_in(x["logps"], beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
                        max_completion_length=7)
    inputs = _trl_inputs(x, old_per_token_logps=x["old"], ref_per_token_logps=x["ref"], num_items_in_batch=num_items)
    want = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss, metrics = grpo_loss(x["logps"], x["old"], x["adv"], x["mask"], epsilon=0.2, epsilon_high=0.28,
                              loss_type=loss_type, beta=beta, ref_logps=x["ref"], kl_estimator="k3",
                              max_completion_length=7, num_items=num_items)
    torch.testing.assert_close(loss, want, **TOL, msg=f"trl {trl.__version__} {loss_type} beta={beta}")
    logged = trainer._metrics["train"]
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[name].item() == pytest.approx(logged[name][0], abs=1e-12), name
    assert metrics["clip_ratio/region_mean"] > 0  # the inputs do reach the clip
    if beta:
        assert metrics["kl"].item() == pytest.approx(logged["kl"][0], rel=1e-12)


def test_rloo_loss_and_its_kl_in_the_reward_match_trl() -> None:
    pytest.importorskip("trl", minversion="1.16")
    from trl.trainer.rloo_trainer import RLOOTrainer

    x = _inputs(seed=2)
    x["logps"] = x["old"] + 0.05 * torch.randn(x["old"].shape, generator=torch.Generator().manual_seed(5),
                                               dtype=torch.float64)  # sequence ratios both inside and past the clip
    old_seq = (x["old"] * x["mask"]).sum(1)
    trainer = _stand_in(x["logps"], epsilon_low=0.2, epsilon_high=0.25)
    want = RLOOTrainer._compute_loss(trainer, None, _trl_inputs(x, old_logps=old_seq))
    loss, metrics = rloo_loss(x["logps"], x["old"], x["adv"], x["mask"], epsilon=0.2, epsilon_high=0.25)
    torch.testing.assert_close(loss, want, **TOL)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(
        trainer._metrics["train"]["clip_ratio/region_mean"][0], abs=1e-12)
    # RLOOTrainer: kl = ((old - ref) * mask).sum(-1); rewards -= beta * kl
    torch.testing.assert_close(sequence_kl(x["old"], x["ref"], x["mask"], "k1"),
                               ((x["old"] - x["ref"]) * x["mask"]).sum(-1), **TOL)


def test_kl_estimators_by_hand() -> None:
    logp, ref = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-1.5], dtype=torch.float64)
    assert KL_ESTIMATORS.get("k1")(logp, ref).item() == pytest.approx(0.5, abs=1e-15)
    assert KL_ESTIMATORS.get("k3")(logp, ref).item() == pytest.approx(math.exp(-0.5) + 0.5 - 1, abs=1e-15)
    with pytest.raises(KeyError, match="k1, k3"):
        KL_ESTIMATORS.get("k2")


def test_the_first_update_of_a_rollout_has_ratio_one_and_no_clipping() -> None:
    x = _inputs(seed=3)
    logps = x["old"].clone().requires_grad_(True)  # the policy that sampled the rollout, not yet updated
    for loss_type in GRPO_LOSSES.names():
        loss, metrics = grpo_loss(logps, logps.detach(), x["adv"], x["mask"], loss_type=loss_type,
                                  max_completion_length=5)
        assert all(metrics[k].item() == 0 for k in metrics if k.startswith("clip_ratio")), loss_type
        # ratio 1: the loss is -mean(A) however the tokens are weighted, the gradient A / tokens
        loss.backward()
        assert torch.isfinite(logps.grad).all() and logps.grad.abs().sum() > 0
        logps.grad = None
    _, metrics = rloo_loss(logps, logps.detach(), x["adv"], x["mask"])
    assert metrics["clip_ratio/region_mean"].item() == 0


# ---- advantages ------------------------------------------------------------------------------------
def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)  # two groups of 4
    std = math.sqrt(1 / 3)  # group 1: mean 0.5, deviations +-0.5, Bessel: 4 * 0.25 / 3
    want = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(group_advantages(rewards, 4, "group"), want / (std + 1e-4), **TOL)
    torch.testing.assert_close(group_advantages(rewards, 4, "none"), want, **TOL)
    batch_std = torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2]).double().std().item()
    torch.testing.assert_close(group_advantages(rewards, 4, "batch"), want / (batch_std + 1e-4), **TOL)
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(rewards, 4, "token")


def test_unscorable_rewards_leave_the_group_statistics_and_get_zero_advantage() -> None:
    rewards = torch.tensor([1.0, NAN, 0.0, 2.0], dtype=torch.float64)  # one group of 4
    got = group_advantages(rewards, 4, "group")
    assert got[1] == 0
    torch.testing.assert_close(got[[0, 2, 3]], torch.tensor([0.0, -1.0, 1.0], dtype=torch.float64) / (1 + 1e-4), **TOL)


def test_leave_one_out_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, NAN, 5.0], dtype=torch.float64)  # two groups of 3
    want = torch.tensor([1 - 0.0, 0 - 0.5, 0 - 0.5, 3 - 5.0, 0.0, 5 - 3.0], dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(rewards, 3), want, **TOL)
    normalized = rloo_advantages(rewards, 3, normalize=True)
    scored = want[[0, 1, 2, 3, 5]]
    torch.testing.assert_close(normalized[[0, 1, 2, 3, 5]], (scored - scored.mean()) / (scored.std() + 1e-4), **TOL)
    assert normalized[4] == 0


# ---- PPO -----------------------------------------------------------------------------------------------
def test_gae_against_a_hand_computed_sequence() -> None:
    # row 0: a prompt token, then 3 completion tokens; row 1: 2 completion tokens, then padding (ignored
    # values and rewards there must not leak in). gamma 0.9, lambda 0.8: gamma * lambda = 0.72
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.float64)
    rewards = torch.tensor([[0, 0.1, -0.2, 1.0], [0, 0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3], [0, 0.2, 0.6, 7.0]], dtype=torch.float64)
    a3 = 1.0 - 0.3  # delta_3: no next value
    a2 = (-0.2 + 0.9 * 0.3 - 0.4) + 0.72 * a3
    a1 = (0.1 + 0.9 * 0.4 - 0.5) + 0.72 * a2
    b2 = 1.0 - 0.6
    b1 = (0 + 0.9 * 0.6 - 0.2) + 0.72 * b2
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    want = torch.tensor([[0, a1, a2, a3], [0, b1, b2, 0]], dtype=torch.float64)
    torch.testing.assert_close(advantages, want, **TOL)
    torch.testing.assert_close(returns, (want + values) * mask, **TOL)


def test_whitening_and_the_ppo_loss_at_the_first_update() -> None:
    x = _inputs(seed=4)
    white = masked_whiten(x["logps"], x["mask"])
    picked = white[x["mask"].bool()]
    assert picked.mean().abs() < 1e-12 and (picked.std() - 1).abs() < 1e-6  # std up to the 1e-8 in the root
    adv, values = white * x["mask"], x["ref"]
    loss, metrics = ppo_loss(x["old"], x["old"], adv, values, values, values + 1.0, x["mask"], vf_coef=0.5)
    # ratio 1, no clipping: policy loss -mean(A) = 0 (whitened), value loss 0.5 * mean(1^2)
    assert metrics["clip_ratio/region_mean"] == 0 and metrics["policy_loss"].abs() < 1e-12
    assert metrics["value_loss"].item() == pytest.approx(0.5, abs=1e-12)
    assert loss.item() == pytest.approx(0.25, abs=1e-12)

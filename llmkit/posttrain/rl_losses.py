"""The pure losses and advantages of online RL: GRPO, RLOO, the KL estimators.

Every per-token tensor is (N, T) over N completions with a 0/1 `mask` of the completion tokens
(padding and prompt tokens are 0); per-sequence tensors are (N,). The rows of a group are
consecutive: rows [g*G, (g+1)*G) are the G completions of prompt g. The formulas are TRL 1.16's
(GRPOTrainer._compute_loss, RLOOTrainer), which tests/posttrain/test_rl_losses.py runs as an oracle
on random float64 inputs.

Advantages. A reward of NaN is unscorable: it is left out of its group's statistics and its
advantage is 0.
    group      (r - mean_group) / (std_group + 1e-4)      std with Bessel's correction (TRL's nanstd)
    batch      (r - mean_group) / (std_batch + 1e-4)
    none       r - mean_group                             (Dr. GRPO)
    RLOO       r - mean of the group's other scorable rewards (the leave-one-out baseline)

KL estimators of KL(pi || ref) per token, from log pi and log ref of the sampled token (Schulman):
    k1   log pi - log ref                                  unbiased, can be negative
    k3   exp(log ref - log pi) - (log ref - log pi) - 1    unbiased, never negative (GRPO's)

GRPO's loss per token is -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta KL, rho the
importance ratio pi / pi_old of the token; the loss types differ only in how tokens are averaged:
    grpo     mean over each sequence's tokens, then over sequences
    bnpo     mean over every token of the batch
    dr_grpo  sum over tokens / (N * max_completion_length)
    dapo     sum over tokens / the tokens of the whole generation batch (`num_items`)
RLOO's ratio is over whole sequences (sums of token log-probs) and its loss a mean over sequences.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from llmkit.posttrain.packing import IGNORE
from llmkit.registry import Registry

STD_EPS = 1e-4  # TRL's: a group whose rewards are all equal gets advantage 0, not 0/0
SCALE_REWARDS = ("group", "batch", "none")


# ---- statistics that skip unscorable (NaN) rewards -----------------------------------------------
def nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Standard deviation with Bessel's correction over the non-NaN entries (TRL's nanstd)."""
    dims = dim if dim is not None else tuple(range(x.dim()))
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims, keepdim=True)
    out = (variance * count / (count - 1)).sqrt()
    return out if keepdim else out.squeeze(dims) if dim is not None else out.reshape(())


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the tokens where mask is 1 (0 when there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ---- advantages ----------------------------------------------------------------------------------
def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "group") -> Tensor:
    """(N,) rewards, NaN where unscorable -> (N,) GRPO advantages (0 where unscorable)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards}: choose one of {', '.join(SCALE_REWARDS)}")
    grouped = rewards.view(-1, num_generations)  # (prompts, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)  # (N,)
    advantages = rewards - mean
    if scale_rewards == "group":
        advantages = advantages / (nanstd(grouped, dim=1).repeat_interleave(num_generations) + STD_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (nanstd(rewards) + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def rloo_advantages(rewards: Tensor, num_generations: int, normalize: bool = False) -> Tensor:
    """(N,) rewards, NaN where unscorable -> (N,) leave-one-out advantages r_i - mean_{j != i} r_j over
    the group's scorable rewards (0 where unscorable or alone); `normalize`: then to mean 0, std 1."""
    grouped = rewards.view(-1, num_generations)  # (prompts, G)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)  # (prompts, 1)
    baseline = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)  # (prompts, G)
    advantages = rewards - baseline.view(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


# ---- KL estimators -------------------------------------------------------------------------------
KL_ESTIMATORS: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("kl_estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    return logps - ref_logps


@KL_ESTIMATORS.register("k3")
def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


# ---- GRPO ----------------------------------------------------------------------------------------
# an entry reduces (N, T) per-token losses over the mask to the scalar loss
GRPO_LOSSES: Registry[Tensor] = Registry("loss_type")


@GRPO_LOSSES.register("grpo")
def reduce_grpo(per_token: Tensor, mask: Tensor, max_completion_length: int, num_items: Tensor | None) -> Tensor:
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


@GRPO_LOSSES.register("bnpo")
def reduce_bnpo(per_token: Tensor, mask: Tensor, max_completion_length: int, num_items: Tensor | None) -> Tensor:
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


@GRPO_LOSSES.register("dr_grpo")
def reduce_dr_grpo(per_token: Tensor, mask: Tensor, max_completion_length: int, num_items: Tensor | None) -> Tensor:
    return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)


@GRPO_LOSSES.register("dapo")
def reduce_dapo(per_token: Tensor, mask: Tensor, max_completion_length: int, num_items: Tensor | None) -> Tensor:
    total = mask.sum() if num_items is None else num_items  # the generation batch's tokens; this batch's by default
    return (per_token * mask).sum() / total.clamp(min=1.0)


def clip_fractions(ratio: Tensor, advantages: Tensor, mask: Tensor, eps_low: float, eps_high: float) -> dict[str, Tensor]:
    """The fraction of tokens (or sequences) whose ratio the clip held back, as TRL logs them."""
    low = ((ratio < 1 - eps_low) & (advantages < 0)).float()
    high = ((ratio > 1 + eps_high) & (advantages > 0)).float()
    return {"clip_ratio/low_mean": masked_mean(low, mask), "clip_ratio/high_mean": masked_mean(high, mask),
            "clip_ratio/region_mean": masked_mean(torch.maximum(low, high), mask)}


def grpo_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, epsilon: float = 0.2,
    epsilon_high: float | None = None, loss_type: str = "dapo", beta: float = 0.0, ref_logps: Tensor | None = None,
    kl_estimator: str = "k3", max_completion_length: int = 1, num_items: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's clipped token-level loss. logps, old_logps, ref_logps, mask: (N, T); advantages: (N,).
    The old and reference log-probs are detached here; returns the loss and TRL's metrics."""
    reduce = GRPO_LOSSES.get(loss_type)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(1)  # (N, 1)
    ratio = torch.exp(logps - old_logps.detach())  # (N, T): exactly 1 at the first update of a rollout
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics = clip_fractions(ratio.detach(), adv, mask, epsilon, eps_high)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs the reference model's log-probs")
        kl = KL_ESTIMATORS.get(kl_estimator)(logps, ref_logps.detach())
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    return reduce(per_token, mask, max_completion_length, num_items), metrics


# ---- RLOO ----------------------------------------------------------------------------------------
def rloo_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, epsilon: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """RLOO's clipped sequence-level loss: the ratio of whole completions. logps, old_logps, mask: (N, T)
    per token (old_logps detached here); advantages (N,)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    seq, old_seq = (logps * mask).sum(-1), (old_logps.detach() * mask).sum(-1)  # (N,)
    ratio = torch.exp(seq - old_seq)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    ones = torch.ones_like(ratio)
    return loss, clip_fractions(ratio.detach(), advantages, ones, epsilon, eps_high)


def sequence_kl(old_logps: Tensor, ref_logps: Tensor, mask: Tensor, estimator: str = "k1") -> Tensor:
    """(N,) the KL of each completion summed over its tokens: RLOO subtracts beta times it from the reward."""
    return (KL_ESTIMATORS.get(estimator)(old_logps, ref_logps) * mask).sum(-1)


# ---- PPO -----------------------------------------------------------------------------------------
def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries (variance with Bessel's correction), as TRL's PPO whitens."""
    mean = masked_mean(x, mask)
    centered = x - mean
    n = mask.sum()
    variance = masked_mean(centered**2, mask) * n / (n - 1).clamp(min=1.0)
    return centered * torch.rsqrt(variance + eps)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over (N, T) per-token rewards and values, masked to the completion:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns A + V; beyond a
    completion's last token V and r are 0, so it bootstraps from nothing. -> (advantages, returns), 0 off the mask."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        following = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(last)
        last = rewards[:, t] + gamma * following - values[:, t] + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def ppo_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, values: Tensor, old_values: Tensor, returns: Tensor,
    mask: Tensor, *, cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped policy loss plus vf_coef times its clipped value loss, token means over the mask; all
    (N, T). The rollout's log-probs, values, advantages and returns are detached here."""
    old_logps, advantages = old_logps.detach(), advantages.detach()
    old_values, returns = old_values.detach(), returns.detach()
    ratio = torch.exp(logps - old_logps)
    pg = masked_mean(torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)), mask)
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)
    metrics = clip_fractions(ratio.detach(), advantages, mask, cliprange, cliprange)
    metrics.update({"policy_loss": pg.detach(), "value_loss": vf.detach()})
    return pg + vf_coef * vf, metrics


def token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """(N, T, V), (N, T) -> (N, T) float32 log p(label) of logits / temperature, 0 where unscored."""
    x = _scaled(logits.float(), temperature)
    picked = x.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)
    return torch.where(labels != IGNORE, picked, 0.0)


@torch.no_grad()
def token_entropy(logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean entropy of the sampling distribution over the completion tokens."""
    x = _scaled(logits.detach()[mask.bool()].float(), temperature)  # (n, V)
    entropy = torch.logsumexp(x, -1) - (x.softmax(-1) * x).sum(-1)
    return entropy.mean() if entropy.numel() else entropy.new_zeros(())


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature; at temperature 1 the logits themselves (a pass over (N, T, V) and its backward saved)."""
    return logits if temperature == 1 else logits / temperature

"""The pure losses of post-training: sequence log-probs, DPO and its variants, Bradley-Terry.

Sequence log-probs. `sequence_logprobs(logits, labels)` is log pi(y | x) of each row: the sum of
log p(labels[b, t] | ids[b, :t+1]) over the scored positions (labels != -100), with the labels of
llmkit/text/chat.py (labels[i] is the target of position i, same length as the ids). It works
in float32 whatever the logits' dtype, as log p = logit[label] - logsumexp(logits), a chunk of
positions at a time, so no fp32 log-softmax of the whole (B, T, V) is built: fp32 logits add no
(B, T, V) tensor, bf16 ones add their fp32 copy (kept for the backward of logsumexp).

DPO. With summed log-probs of the policy (pi) and the frozen reference (ref) for the chosen (c)
and rejected (r) reply of each pair, the implicit reward of a reply is beta * (pi - ref) and

    z = (pi_c - pi_r) - (ref_c - ref_r)          (B,)   the log-ratio margin; 0 at init (pi == ref)

The losses (per pair, averaged over the batch; eps = label_smoothing) are those of TRL's
DPOTrainer, which tests/posttrain/test_losses.py runs as an oracle (trl 1.16.0):

    sigmoid  -(1 - eps) logsig(beta z) - eps logsig(-beta z)
             Rafailov et al. 2023; eps > 0 is conservative DPO (cDPO, Mitchell 2023): the labels
             are flipped with probability eps. TRL < 1.0 applies eps to its `sigmoid` exactly so;
             TRL 1.x's `sigmoid` ignores label_smoothing (its `aot` on one pair is this formula).
             eps = 0.5 leaves no preference: the loss is log(2 cosh(beta z / 2)), even in z.
    robust   (-(1 - eps) logsig(beta z) + eps logsig(-beta z)) / (1 - 2 eps)
             Chowdhury et al. 2024, TRL's `robust`: an unbiased estimate of the clean loss under
             labels flipped with probability eps, in [0, 0.5). eps = 0 is `sigmoid`.
    ipo      (z - 1 / (2 beta))^2
             Azar et al. 2023, eq. 17 (beta is their tau); z is not scaled by beta. TRL divides
             each reply's log-ratio by its number of completion tokens before this: to match it,
             pass per-token means (`sequence_logprobs(..., average=True)`) for all four inputs.
             No label smoothing.

All of them are ln 2 (sigmoid, robust) at init. `dpo_loss` detaches the reference log-probs
itself, so gradients reach the policy only, and returns TRL's logged metrics (batch means of the
detached rewards): rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies.

Reward model. `bradley_terry_loss` is -logsig(r_c - r_r - margin), as TRL's RewardTrainer with an
optional per-pair margin (Llama 2), with reward/accuracy (r_c > r_r) and reward/margin (r_c - r_r).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llmkit.registry import Registry

IGNORE = -100  # labels that are not scored


def sequence_logprobs(logits: Tensor, labels: Tensor, *, average: bool = False, chunk: int = 4096) -> Tensor:
    """Sum over scored positions of log p(labels[b, t]), in float32: (B, T, V), (B, T) -> (B,).
    average: divide by the number of scored positions (at least 1), as TRL's `ipo` needs.
    chunk: positions per logsumexp, bounding the fp32 temporaries to (chunk, V)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in (B, T)")
    flat = logits.reshape(-1, logits.size(-1))  # (B*T, V)
    mask = labels.reshape(-1) != IGNORE  # (B*T,)
    idx = labels.reshape(-1).clamp(min=0).unsqueeze(-1)  # (B*T, 1): ignored positions read token 0, then are masked
    parts = []
    for x, i in zip(flat.split(chunk), idx.split(chunk), strict=True):  # split, not indexing: its backward is one cat
        x = x.float()  # (n, V); a no-op for fp32 logits
        parts.append(x.gather(-1, i).squeeze(-1) - torch.logsumexp(x, dim=-1))  # (n,)
    token_logps = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    token_logps = torch.where(mask, token_logps, 0.0).view(labels.shape)  # (B, T)
    total = token_logps.sum(-1)  # (B,)
    if average:
        return total / mask.view(labels.shape).sum(-1).clamp(min=1)
    return total


# ---- DPO -----------------------------------------------------------------------------------------
# an entry maps the margin z (B,), beta and label_smoothing to the per-pair loss (B,)
DPO_LOSSES: Registry[Tensor] = Registry("DPO loss")


def _check_smoothing(kind: str, eps: float, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"DPO loss '{kind}': label_smoothing must be {allowed}; got {eps}")


@DPO_LOSSES.register("sigmoid")
def sigmoid_dpo(z: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO, conservative (cDPO) when label_smoothing > 0."""
    eps = label_smoothing
    _check_smoothing("sigmoid", eps, 0.0 <= eps <= 0.5, "in [0, 0.5]")
    return -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)


@DPO_LOSSES.register("robust")
def robust_dpo(z: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO: unbiased under labels flipped with probability label_smoothing."""
    eps = label_smoothing
    _check_smoothing("robust", eps, 0.0 <= eps < 0.5, "in [0, 0.5)")
    return (-(1 - eps) * F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)) / (1 - 2 * eps)


@DPO_LOSSES.register("ipo")
def ipo(z: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """IPO: regress the margin to 1 / (2 beta)."""
    _check_smoothing("ipo", label_smoothing, label_smoothing == 0.0, "0 (IPO has none)")
    return (z - 1 / (2 * beta)) ** 2


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The mean DPO loss of `kind` over B pairs of summed log-probs (each (B,)) and TRL's metrics.
    The reference log-probs are detached here."""
    if beta <= 0:
        raise ValueError(f"beta must be positive; got {beta}")
    loss_fn = DPO_LOSSES.get(kind)
    chosen = policy_chosen - ref_chosen.detach()  # (B,) log-ratios
    rejected = policy_rejected - ref_rejected.detach()  # (B,)
    loss = loss_fn(chosen - rejected, beta, label_smoothing).mean()
    chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()  # (B,)
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
    }
    return loss, metrics


# ---- reward model --------------------------------------------------------------------------------
def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """-logsig(r_c - r_r - margin) averaged over B pairs (each (B,)); margin (B,) defaults to 0."""
    diff = r_chosen - r_rejected  # (B,)
    loss = -F.logsigmoid(diff if margin is None else diff - margin).mean()
    d = diff.detach()
    return loss, {"reward/accuracy": (d > 0).float().mean(), "reward/margin": d.mean()}

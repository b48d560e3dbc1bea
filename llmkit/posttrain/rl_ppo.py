"""PPO (`task=ppo`): online RL with a learned value baseline, on the rollout machinery of llmkit/posttrain/rl.py.

A value head (a Linear on the final hidden state, starting at zero, trained and saved with the
objective) predicts each completion token's return. The rollout's per-token reward is the KL penalty
-beta * (log pi_old - log ref) on every token (k1, when beta != 0) plus the reward's score on the
completion's last token; advantages are GAE(gamma, lambda) over the completion, whitened over the
batch; returns = advantages + values. The loss is the clipped policy loss plus vf_coef times the
clipped value loss (llmkit/posttrain/rl_losses.py: gae, masked_whiten, ppo_loss). PPO needs no group:
num_generations may be 1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from llmkit.model import Transformer
from llmkit.posttrain.grouped import ScoredLogits
from llmkit.posttrain.objectives import OBJECTIVES
from llmkit.posttrain.rl import OnlineRL, Rollout
from llmkit.posttrain.rl_losses import KL_ESTIMATORS, gae, masked_whiten, ppo_loss


def last_token_positions(mask: Tensor) -> Tensor:
    """(N,) the position of each row's last completion token: mask (N, T) 0/1."""
    T = mask.size(1)
    return T - 1 - mask.flip(-1).argmax(dim=-1)


@OBJECTIVES.register("ppo")
class PPO(OnlineRL):
    min_generations = 1
    sequence_kl = False  # the KL is a per-token reward here (finish)
    default_kl_in = "reward"
    default_kl_estimator = "k1"

    def __init__(self, *args: Any, gamma: float = 1.0, lam: float = 0.95, cliprange_value: float = 0.2,
                 vf_coef: float = 0.1, whiten_advantages: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.kl_in != "reward":
            raise ValueError("task=ppo puts the KL into the per-token reward (kl_in=reward)")
        self.gamma, self.lam, self.cliprange_value, self.vf_coef = gamma, lam, cliprange_value, vf_coef
        self.whiten = whiten_advantages
        self.value_head: nn.Linear | None = None

    def attach(self, model: Transformer, init_from: str | None, finetune: str) -> None:
        super().attach(model, init_from, finetune)
        w = model.head.weight
        self.value_head = nn.Linear(model.cfg.d_model, 1, bias=False, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.value_head.weight)

    def values(self, hidden: Tensor) -> Tensor:
        """(N, T, C) final hidden states -> (N, T) float values: V_t is the value of the state whose logits
        sample labels[t] (tokens 0..t seen), the alignment of the per-token log-probs and rewards."""
        return self.value_head(hidden).squeeze(-1).float()

    def logits(self, model: Transformer, ids: Tensor, labels: Tensor) -> ScoredLogits:
        return ScoredLogits(model(ids), labels)  # the plain forward, as policy_forward's (the value head reads its states)

    def policy_forward(self, model: Transformer, rollout: Rollout) -> tuple[ScoredLogits, Tensor | None]:
        logits, hidden = model.logits_and_features(rollout.ids)  # (N, T, V), (N, T, C): one call, FSDP gathers the root once
        return ScoredLogits(logits, rollout.labels), hidden

    def finish(self, model: Transformer, rollout: Rollout) -> dict[str, Tensor]:
        mask, logs = rollout.mask, {}
        with torch.no_grad():
            logits, hidden = self.policy_forward(model, rollout)
            old = logits.logprobs(self.temperature)
            values = self.values(hidden) * mask
        rewards = torch.zeros_like(values)  # (N, T)
        if self.beta != 0:
            kl = KL_ESTIMATORS.get(self.kl_estimator)(old, rollout.ref_logps) * mask  # (N, T)
            rewards = rewards - self.beta * kl
            logs["kl"] = kl.sum() / mask.sum().clamp(min=1)
        score = torch.nan_to_num(rollout.rewards, nan=0.0).to(values)  # unscorable: no score, the KL still counts
        rows = torch.arange(mask.size(0), device=mask.device)
        rewards[rows, last_token_positions(mask)] += score
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        if self.whiten:
            advantages = masked_whiten(advantages, mask) * mask
        rollout.advantages, rollout.returns, rollout.old_values = advantages, returns, values
        return logs

    def loss(self, logps: Tensor, old_logps: Tensor, rollout: Rollout, hidden: Tensor | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
        return ppo_loss(logps, old_logps, rollout.advantages, self.values(hidden), rollout.old_values,
                        rollout.returns, rollout.mask, cliprange=self.epsilon, cliprange_value=self.cliprange_value,
                        vf_coef=self.vf_coef)

"""Direct preference optimisation (Rafailov et al., 2023): the loss of a batch of pairs from the
log-probabilities of their replies under the policy and the frozen reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmforge.data.batch import IGNORE


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 [B]: each row's sum of log p(target) over its targets that are not IGNORE (logits [B, T, V])."""
    nats = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return -nats.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """(mean over pairs of -log σ(r_c - r_r), {logged part: detached value}), where a reply's implicit
    reward is r = β (log π(reply) - log π_ref(reply)); all arguments are [pairs] log-probabilities."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    parts = {"dpo_loss": loss, "reward_accuracy": (margin > 0).float().mean(), "reward_margin": margin.mean(),
             "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean()}
    return loss, {k: v.detach() for k, v in parts.items()}

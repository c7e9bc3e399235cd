"""The training objective: next-token cross-entropy, PaLM's z-loss, multi-token prediction and any
auxiliary model losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slmforge.data.batch import IGNORE


def mean_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE (0 when none is: a row of a user's turn
    alone contributes nothing rather than NaN), in fp32."""
    nats = F.cross_entropy(logits.float().flatten(0, -2), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return nats / (targets != IGNORE).sum().clamp(min=1)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, aux: dict, z_loss: float,
            mtp_weight: float = 0.0, documents: torch.Tensor | None = None,
            ce_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """(total loss to backpropagate, {part name: detached value}) for logits [B, T, V], targets [B, T].

    ce_loss is the mean next-token cross-entropy over the targets not marked IGNORE (a loss mask);
    z_loss = z_loss · mean(logsumexp(logits)²) over the same positions keeps the softmax normaliser near 1
    (PaLM), which keeps bf16 logits stable. Both run in fp32 even under autocast. MTP depth k's logits
    (aux["mtp_logits"][k - 1], [B, T - k, V]) predict targets[:, k:], except across packed `documents`;
    mtp_loss = mtp_weight · mean over depths of their cross-entropies (DeepSeek-V3's λ/D·Σ), each depth's
    own value logged as mtp_ce_k. Every other `aux` entry whose key ends in "_loss" (a router balance
    loss) is added as it is: the model owns its coefficients. `ce_weight` scales ce_loss in the total (its
    logged value stays unscaled), for objectives that mix it with a loss of their own.
    """
    parts = {"ce_loss": mean_ce(logits, targets)}
    if z_loss > 0:
        scored = (targets != IGNORE).reshape(-1)
        lse = torch.logsumexp(logits.float().flatten(0, -2), dim=-1)
        parts["z_loss"] = z_loss * (lse.square() * scored).sum() / scored.sum().clamp(min=1)
    mtp = aux.get("mtp_logits") or []
    if mtp:
        depth_ce = []
        for k, m in enumerate(mtp, start=1):
            shifted = targets[:, k:]
            if documents is not None:  # position i's depth-k target lies in its own document or is not one
                shifted = shifted.masked_fill(documents[:, k:] != documents[:, :-k], IGNORE)
            depth_ce.append(mean_ce(m, shifted))
        parts["mtp_loss"] = mtp_weight * torch.stack(depth_ce).mean()
    parts.update({k: v for k, v in aux.items() if k.endswith("_loss")})
    total = sum(v * ce_weight if k == "ce_loss" else v for k, v in parts.items())
    logged = {k: v.detach() for k, v in parts.items()}
    if mtp:
        logged.update({f"mtp_ce_{k}": v.detach() for k, v in enumerate(depth_ce, start=1)})
    return total, logged


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Mean over the positions whose target is not IGNORE of KL(teacher || student), both softmaxed at
    `temperature`: sum_v p_t (log p_t - log p_s), in fp32 (logits [B, T, V], targets [B, T])."""
    scored = (targets != IGNORE).reshape(-1)
    s = torch.log_softmax(student.float().flatten(0, -2)[scored] / temperature, dim=-1)
    t = torch.log_softmax(teacher.float().flatten(0, -2)[scored] / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).sum() / scored.sum().clamp(min=1)

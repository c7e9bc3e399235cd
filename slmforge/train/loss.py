"""The training objective: next-token cross-entropy, PaLM's z-loss, multi-token prediction and any
auxiliary model losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, aux: dict, z_loss: float,
            mtp_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """(total loss to backpropagate, {part name: detached value}) for logits [B, T, V], targets [B, T].

    ce_loss is the mean next-token cross-entropy; z_loss = z_loss · mean(logsumexp(logits)²) keeps the
    softmax normaliser near 1 (PaLM), which keeps bf16 logits stable. Both run in fp32 even under
    autocast. MTP depth k's logits (aux["mtp_logits"][k - 1], [B, T - k, V]) predict targets[:, k:];
    mtp_loss = mtp_weight · mean over depths of their cross-entropies (DeepSeek-V3's λ/D·Σ), each depth's
    own value logged as mtp_ce_k. Every other `aux` entry whose key ends in "_loss" (a router balance
    loss) is added as it is: the model owns its coefficients.
    """
    flat = logits.float().flatten(0, -2)
    ce = F.cross_entropy(flat, targets.reshape(-1))
    parts = {"ce_loss": ce}
    if z_loss > 0:
        parts["z_loss"] = z_loss * torch.logsumexp(flat, dim=-1).square().mean()
    mtp = aux.get("mtp_logits") or []
    if mtp:
        depth_ce = [F.cross_entropy(m.float().flatten(0, -2), targets[:, k:].reshape(-1))
                    for k, m in enumerate(mtp, start=1)]
        parts["mtp_loss"] = mtp_weight * torch.stack(depth_ce).mean()
    parts.update({k: v for k, v in aux.items() if k.endswith("_loss")})
    total = sum(parts.values())
    logged = {k: v.detach() for k, v in parts.items()}
    if mtp:
        logged.update({f"mtp_ce_{k}": v.detach() for k, v in enumerate(depth_ce, start=1)})
    return total, logged

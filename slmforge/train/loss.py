"""The training objective: next-token cross-entropy, PaLM's z-loss, and any auxiliary model losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, aux: dict, z_loss: float) -> tuple[torch.Tensor, dict]:
    """(total loss to backpropagate, {part name: detached value}) for logits [B, T, V], targets [B, T].

    ce_loss is the mean next-token cross-entropy; z_loss = z_loss · mean(logsumexp(logits)²) keeps the
    softmax normaliser near 1 (PaLM), which keeps bf16 logits stable. Both run in fp32 even under
    autocast. Every `aux` entry whose key ends in "_loss" (a router balance loss, an MTP loss, ...) is
    added as it is: the model owns its coefficients.
    """
    logits = logits.float().flatten(0, -2)
    ce = F.cross_entropy(logits, targets.reshape(-1))
    parts = {"ce_loss": ce}
    if z_loss > 0:
        parts["z_loss"] = z_loss * torch.logsumexp(logits, dim=-1).square().mean()
    parts.update({k: v for k, v in aux.items() if k.endswith("_loss")})
    total = sum(parts.values())
    return total, {k: v.detach() for k, v in parts.items()}

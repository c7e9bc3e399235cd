"""What a training step minimises, given the model and one `Batch`: the trainer calls an objective and
knows nothing of how its loss is made. Language modeling covers pretraining and supervised fine-tuning
(the batch's targets mask what is not learned); distillation adds a teacher's distribution."""

from __future__ import annotations

from collections.abc import Callable

import torch

from slmforge.config import RunConfig
from slmforge.data.batch import Batch
from slmforge.train.loss import distillation_kl, lm_loss


class LanguageModeling:
    """Next-token cross-entropy with the optional z-loss, MTP loss and the model's own auxiliary losses."""

    def __init__(self, z_loss: float = 0.0, mtp_weight: float = 0.0):
        self.z_loss, self.mtp_weight = z_loss, mtp_weight

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict, dict]:
        """(loss to backpropagate, {logged part: detached value}, the model's aux outputs)."""
        logits, aux = model(batch.tokens, **batch.model_inputs())
        loss, parts = lm_loss(logits, batch.targets, aux, self.z_loss, self.mtp_weight, batch.documents)
        return loss, parts, aux


class Distillation(LanguageModeling):
    """(1 - weight) · the data's cross-entropy + weight · T² · KL(teacher || student) at temperature T, over
    the positions the data scores; T² keeps the KL term's gradients on the scale of the cross-entropy's
    (Hinton et al., 2015). The teacher runs without gradients, in eval mode."""

    def __init__(self, teacher: torch.nn.Module, temperature: float, weight: float, z_loss: float = 0.0,
                 mtp_weight: float = 0.0):
        super().__init__(z_loss, mtp_weight)
        self.teacher, self.temperature, self.weight = teacher.eval().requires_grad_(False), temperature, weight

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict, dict]:
        logits, aux = model(batch.tokens, **batch.model_inputs())
        loss, parts = lm_loss(logits, batch.targets, aux, self.z_loss, self.mtp_weight, batch.documents,
                              ce_weight=1.0 - self.weight)
        with torch.no_grad():
            teacher_logits, _ = self.teacher(batch.tokens, **batch.model_inputs())
        kl = distillation_kl(logits, teacher_logits, batch.targets, self.temperature)
        parts["kd_loss"] = kl.detach()
        return loss + self.weight * self.temperature ** 2 * kl, parts, aux


def build_objective(cfg: RunConfig, device: torch.device, log: Callable[[str], None]):
    """The objective `cfg` asks for: distillation when distill.teacher is set, else language modeling."""
    t = cfg.train
    if cfg.distill.teacher:
        from slmforge.infer.load import load_model

        teacher = load_model(cfg.distill.teacher, device=str(device), dtype="fp32").model
        log(f"distilling from {cfg.distill.teacher} ({sum(p.numel() for p in teacher.parameters()):,} parameters; "
            f"temperature {cfg.distill.temperature:g}, KL weight {cfg.distill.weight:g})")
        return Distillation(teacher, cfg.distill.temperature, cfg.distill.weight, t.z_loss, t.mtp_weight)
    return LanguageModeling(t.z_loss, t.mtp_weight)

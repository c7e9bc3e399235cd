"""What a training step minimises, given the model and one `Batch`: the trainer calls an objective and
knows nothing of how its loss is made. Language modeling covers pretraining and supervised fine-tuning
(the batch's targets mask what is not learned)."""

from __future__ import annotations

import torch

from slmforge.data.batch import Batch
from slmforge.train.loss import lm_loss


class LanguageModeling:
    """Next-token cross-entropy with the optional z-loss, MTP loss and the model's own auxiliary losses."""

    def __init__(self, z_loss: float = 0.0, mtp_weight: float = 0.0):
        self.z_loss, self.mtp_weight = z_loss, mtp_weight

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict, dict]:
        """(loss to backpropagate, {logged part: detached value}, the model's aux outputs)."""
        logits, aux = model(batch.tokens, **batch.model_inputs())
        loss, parts = lm_loss(logits, batch.targets, aux, self.z_loss, self.mtp_weight, batch.documents)
        return loss, parts, aux

"""What a training step minimises, given the model and one `Batch`: the trainer calls an objective and
knows nothing of how its loss is made. Language modeling covers pretraining and supervised fine-tuning
(the batch's targets mask what is not learned); distillation adds a teacher's distribution; preference
tuning (DPO) compares the replies of pairs against a frozen reference."""

from __future__ import annotations

from collections.abc import Callable

import torch

from slmforge.config import ConfigError, RunConfig
from slmforge.data.batch import Batch
from slmforge.eval.heldout import batch_sums, eval_sums, figures, sum_over_batches
from slmforge.train.dpo import dpo_loss, sequence_logprobs
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

    @staticmethod
    def averaged_over(batch: Batch) -> int:
        """The count the loss of `batch` is a mean over: its scored targets."""
        return batch.scored

    def validation_sums(self, model, batches: list[Batch], byte_lengths, autocast_ctx=None) -> torch.Tensor:
        """float64 sums over the validation batches that processes add before `validation_figures` divides:
        the data's cross-entropy, scored tokens and their bytes."""
        return eval_sums(model, batches, byte_lengths, autocast_ctx)

    @staticmethod
    def validation_figures(sums: torch.Tensor) -> dict:
        """{loss, ppl, bpb} from `validation_sums`."""
        return figures(sums)


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


class Preference:
    """DPO on batches of pairs (slmforge.data.preference_batches: B chosen rows, then their B rejected rows):
    -log σ(β ((π_c - ref_c) - (π_r - ref_r))) averaged over pairs, from each reply's summed log-probability
    under the policy (π) and the frozen reference (ref, without gradients, in eval mode), plus the model's
    own auxiliary losses (a router balance loss)."""

    def __init__(self, reference: torch.nn.Module, beta: float):
        self.reference, self.beta = reference.eval().requires_grad_(False), beta

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict, dict]:
        logits, aux = model(batch.tokens, **batch.model_inputs())
        policy = sequence_logprobs(logits, batch.targets)
        with torch.no_grad():
            reference_logits, _ = self.reference(batch.tokens, **batch.model_inputs())
            reference = sequence_logprobs(reference_logits, batch.targets)
        pairs = len(batch) // 2
        loss, parts = dpo_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], self.beta)
        model_losses = {k: v for k, v in aux.items() if k.endswith("_loss")}
        parts.update({k: v.detach() for k, v in model_losses.items()})
        # DPO does not train the multi-token-prediction modules; a zero term keeps them in the graph, so that
        # DDP finds a (zero) gradient for every parameter
        unused = sum(m.float().mean() for m in aux.get("mtp_logits") or [])
        return loss + sum(model_losses.values()) + 0.0 * unused, parts, aux

    @staticmethod
    def averaged_over(batch: Batch) -> int:
        """The count the loss of `batch` is a mean over: its pairs."""
        return batch.examples

    def validation_sums(self, model, batches: list[Batch], byte_lengths, autocast_ctx=None) -> torch.Tensor:
        """float64 [7] over paired validation batches: the chosen replies' cross-entropy, tokens and bytes, then
        the DPO loss summed over pairs, the pairs whose chosen reply has the higher reward, the summed reward
        margins, and the pair count."""
        byte_lengths = torch.as_tensor(byte_lengths, dtype=torch.float64, device=next(model.parameters()).device)

        def score(batch: Batch, logits: torch.Tensor) -> torch.Tensor:
            pairs = batch.examples
            policy = sequence_logprobs(logits, batch.targets)
            reference = sequence_logprobs(self.reference(batch.tokens)[0], batch.targets)
            _, parts = dpo_loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], self.beta)
            means = torch.stack([parts[k] for k in ("dpo_loss", "reward_accuracy", "reward_margin")]).double()
            count = torch.tensor([pairs], dtype=torch.float64, device=logits.device)
            return torch.cat([batch_sums(logits[:pairs], batch.targets[:pairs], byte_lengths), means * pairs, count])

        return sum_over_batches(model, batches, score, 7, autocast_ctx)

    @staticmethod
    def validation_figures(sums: torch.Tensor) -> dict:
        """The preferred replies' {loss, ppl, bpb}, and the held-out pairs' dpo_loss, reward_accuracy and
        reward_margin (means over pairs)."""
        pairs = sums[6].item()
        return {**figures(sums[:3]), "dpo_loss": sums[3].item() / pairs, "reward_accuracy": sums[4].item() / pairs,
                "reward_margin": sums[5].item() / pairs}


def _preference_objective(cfg: RunConfig, datasets: list, device: torch.device,
                          log: Callable[[str], None]) -> Preference | None:
    """DPO when the run's data (`datasets`, one per phase) is preference data (data prepare --preference),
    else None."""
    phases = cfg.run_phases()
    kinds = [dataset.kind == "preference" for dataset in datasets]
    if not any(kinds):
        if cfg.preference.reference:
            raise ConfigError(f"preference.reference={cfg.preference.reference}: the run's data is not preference "
                              "data (`slmforge data prepare --preference`), so no reference model is read")
        return None
    if not all(kinds):
        raise ConfigError(f"phase '{phases[kinds.index(True)].name}' trains on preference data and phase "
                          f"'{phases[kinds.index(False)].name}' does not: a run has one objective, so tune "
                          "preferences in a run of their own (train.init: the other run)")
    if cfg.distill.teacher:
        raise ConfigError(f"distill.teacher={cfg.distill.teacher} with preference data: DPO and distillation are "
                          "two objectives, a run has one")
    reference = cfg.preference.reference or cfg.train.init
    if not reference:
        raise ConfigError("DPO on preference data needs a reference model: set train.init (the model to tune, "
                          "also the reference by default) or preference.reference")
    from slmforge.checkpoint.integrity import CheckpointError
    from slmforge.infer.load import load_model

    try:
        loaded = load_model(reference, device=str(device), dtype="fp32")
    except CheckpointError as e:
        raise ConfigError(f"preference.reference={reference}: {e}") from None
    if loaded.config.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"preference.reference={reference}: its vocabulary has {loaded.config.model.vocab_size} "
                          f"tokens, the policy's {cfg.model.vocab_size}: DPO compares the two models' "
                          "log-probabilities of the same tokens")
    log(f"DPO against the frozen reference {loaded.checkpoint} "
        f"({sum(p.numel() for p in loaded.model.parameters()):,} parameters; beta {cfg.preference.beta:g})")
    return Preference(loaded.model, cfg.preference.beta)


def build_objective(cfg: RunConfig, datasets: list, device: torch.device, log: Callable[[str], None]):
    """The objective `cfg` asks for: DPO on preference data (`datasets`: each phase's TokenDataset),
    distillation when distill.teacher is set, else language modeling."""
    t = cfg.train
    preference = _preference_objective(cfg, datasets, device, log)
    if preference is not None:
        return preference
    if cfg.distill.teacher:
        from slmforge.infer.load import load_model

        teacher = load_model(cfg.distill.teacher, device=str(device), dtype="fp32").model
        log(f"distilling from {cfg.distill.teacher} ({sum(p.numel() for p in teacher.parameters()):,} parameters; "
            f"temperature {cfg.distill.temperature:g}, KL weight {cfg.distill.weight:g})")
        return Distillation(teacher, cfg.distill.temperature, cfg.distill.weight, t.z_loss, t.mtp_weight)
    return LanguageModeling(t.z_loss, t.mtp_weight)

"""Held-out loss, perplexity and bits per byte.

Bits per byte (sum of cross-entropy nats / (ln 2 · sum of UTF-8 bytes of the target tokens)) does not
depend on the tokenizer, so models with different vocabularies can be compared on it.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from slmforge.data.batch import IGNORE


def batch_sums(logits: torch.Tensor, targets: torch.Tensor, byte_lengths: torch.Tensor) -> torch.Tensor:
    """float64 [3]: (sum of CE nats, scored target tokens, their bytes) of one batch's logits [B, T, V];
    targets marked IGNORE are not scored. byte_lengths: float64 bytes per token id, on the logits' device."""
    y = targets.reshape(-1)
    nats = F.cross_entropy(logits.float().flatten(0, -2), y, reduction="sum", ignore_index=IGNORE)
    scored = y[y != IGNORE]
    return torch.stack([nats.double(), torch.tensor(scored.numel(), dtype=torch.float64, device=y.device),
                        byte_lengths[scored].sum()])


@torch.no_grad()
def sum_over_batches(model, batches, score, size: int, autocast_ctx=None) -> torch.Tensor:
    """float64 [size]: `score(batch, logits)` added over `batches` (`Batch`es, moved to the model's device),
    the model in eval mode; score runs inside `autocast_ctx` too.

    Sums, not means, so processes of a distributed run can add theirs before dividing.
    """
    device = next(model.parameters()).device
    sums = torch.zeros(size, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for batch in batches:
        batch = batch.to(device)
        with autocast_ctx or contextlib.nullcontext():
            logits, _ = model(batch.tokens, **batch.model_inputs())
            sums += score(batch, logits)
    model.train(was_training)
    return sums


def eval_sums(model, batches, token_byte_lengths, autocast_ctx=None) -> torch.Tensor:
    """float64 [3]: `batch_sums` added over `batches` (`Batch`es)."""
    byte_lengths = torch.as_tensor(token_byte_lengths, dtype=torch.float64, device=next(model.parameters()).device)
    return sum_over_batches(model, batches, lambda batch, logits: batch_sums(logits, batch.targets, byte_lengths), 3,
                            autocast_ctx)


def figures(sums: torch.Tensor) -> dict:
    """loss (nats per token), ppl and bpb from `eval_sums`."""
    nats, tokens, n_bytes = sums.tolist()
    loss = nats / tokens
    bpb = nats / (math.log(2) * n_bytes) if n_bytes else float("nan")  # only special tokens: no bytes
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": bpb}


def evaluate(model, batches, token_byte_lengths, autocast_ctx=None) -> dict:
    """dict(loss, ppl, bpb) of `model` on `batches` (a list of `Batch`).

    token_byte_lengths: bytes per token id (`Tokenizer.token_byte_lengths()`); autocast_ctx: a reusable
    context entered around each forward pass (`slmforge.hardware.autocast(device, dtype)`), None for none.
    """
    return figures(eval_sums(model, batches, token_byte_lengths, autocast_ctx))

"""The output head shared by the model families: hidden states -> logits through the (possibly tied) head
weight, then the optional final soft-cap c * tanh(logits / c) (Gemma 2)."""

import torch
import torch.nn.functional as F
from torch import nn


def head_logits(h: torch.Tensor, weight: torch.Tensor, cap: float | None,
                decode_proj: nn.Module | None = None) -> torch.Tensor:
    """Logits of hidden states h [..., d]; `decode_proj` replaces the product with `weight` when
    `slmforge.infer.kernels` prepared the model for decoding."""
    logits = F.linear(h, weight) if decode_proj is None else decode_proj(h)
    if cap is None:
        return logits
    if torch.is_grad_enabled() and logits.requires_grad:
        return _SoftcapFunction.apply(logits, cap)
    return logits.div_(cap).tanh_().mul_(cap)


class _SoftcapFunction(torch.autograd.Function):
    """cap * tanh(x / cap), in place on x (a fresh matmul output nothing else keeps), with the backward
    d/dx = 1 - (y / cap)²: no extra [B, T, V] tensor in the forward, one in the backward."""

    @staticmethod
    def forward(ctx, x, cap):
        y = x.div_(cap).tanh_().mul_(cap)
        ctx.mark_dirty(x)
        ctx.save_for_backward(y)
        ctx.cap = cap
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y / ctx.cap), None

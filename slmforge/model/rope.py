"""Rotary position embedding in the two layouts found in the wild.

"half" rotates channel i with channel i + d/2 (Llama/HF, llama.cpp NEOX); "pairs" rotates adjacent
channels (2i, 2i+1) (GPT-J, DeepSeek, llama.cpp NORM). Exporters depend on which one a model uses.

Both are y = x * cos + swap(x) * sin_signed, with full-width tables (cos repeated over each rotated pair,
sin negated on the first member of each pair) and swap() exchanging the two members of every pair. The
rotation's transpose is the same map with -sin_signed, which is the backward pass: 3 element-wise passes
each way instead of ~8 forward and ~12 backward for the textbook formula under autograd.
"""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, base: float, layout: str):
        super().__init__()
        self.head_dim, self.max_seq_len, self.base, self.layout = head_dim, max_seq_len, base, layout
        # Not saved with the weights: derived from the config.
        self.register_buffer("cos_full", None, persistent=False)  # [max_seq_len, d]
        self.register_buffer("sin_signed", None, persistent=False)
        self.reset_tables()

    def reset_tables(self) -> None:
        """Compute the tables again (a loader that builds modules without running their computations, as
        transformers' from_pretrained does, leaves them unset)."""
        # in float64 on the CPU whatever the default device: the same tables everywhere
        cpu = torch.device("cpu")
        d = self.head_dim
        inv_freq = 1.0 / (self.base ** (torch.arange(0, d, 2, dtype=torch.float64, device=cpu) / d))
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64, device=cpu), inv_freq)
        cos_full, sin_signed = full_tables(angles.cos().float(), angles.sin().float(), self.layout)
        device = self.cos_full.device if self.cos_full is not None and not self.cos_full.is_meta else cpu
        self.cos_full, self.sin_signed = cos_full.to(device), sin_signed.to(device)

    def full_tables(self, positions: torch.Tensor | None, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-width (cos, sin_signed) for `rope` on x [B, T, H, d]: [T, 1, d] or [B, T, 1, d]."""
        if positions is None:
            return self.cos_full[:seq_len, None], self.sin_signed[:seq_len, None]
        index = positions.clamp(min=0)
        return self.cos_full[index].unsqueeze(-2), self.sin_signed[index].unsqueeze(-2)


def full_tables(cos: torch.Tensor, sin: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width cos/sin [..., d/2] -> (cos, sin_signed) [..., d] in the channel order of `layout`."""
    if layout == "half":
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    return (torch.stack((cos, cos), dim=-1).flatten(-2), torch.stack((-sin, sin), dim=-1).flatten(-2))


def _swap(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Exchange the two members of every rotated pair of channels."""
    if layout == "half":
        half = x.shape[-1] // 2
        return torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.stack((x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, layout: str,
            inverse: bool = False) -> torch.Tensor:
    out = x * cos
    return out.addcmul_(_swap(x, layout), sin_signed, value=-1.0 if inverse else 1.0)


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin_signed, layout):
        ctx.save_for_backward(cos, sin_signed)
        ctx.layout = layout
        return _rotate(x, cos, sin_signed, layout)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos, sin_signed = ctx.saved_tensors
        return _rotate(grad, cos, sin_signed, ctx.layout, inverse=True), None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate x [..., d] by full-width tables that broadcast against it (from `RotaryEmbedding.full_tables`).
    The tables are not differentiated."""
    if cos.dtype != x.dtype:
        cos, sin_signed = cos.to(x.dtype), sin_signed.to(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return _RopeFunction.apply(x, cos, sin_signed, layout)
    return _rotate(x, cos, sin_signed, layout)


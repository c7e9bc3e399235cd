"""Rotary position embedding in the two layouts found in the wild.

"half" rotates channel i with channel i + d/2 (Llama/HF, llama.cpp NEOX); "pairs" rotates adjacent
channels (2i, 2i+1) (GPT-J, DeepSeek, llama.cpp NORM). Exporters depend on which one a model uses.

Both are y = x * cos + swap(x) * sin_signed, with full-width tables (cos repeated over each rotated pair,
sin negated on the first member of each pair) and swap() exchanging the two members of every pair. The
rotation's transpose is the same map with -sin_signed, which is the backward pass: 3 element-wise passes
each way instead of ~8 forward and ~12 backward for the textbook formula under autograd.
"""

import math

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, base: float, layout: str, scaling=None):
        super().__init__()
        self.head_dim, self.max_seq_len, self.base, self.layout = head_dim, max_seq_len, base, layout
        self.scaling = scaling  # a RopeScalingConfig, or None: plain RoPE
        # Not saved with the weights: derived from the config.
        self.register_buffer("cos_full", None, persistent=False)  # [max_seq_len, d]
        self.register_buffer("sin_signed", None, persistent=False)
        self.reset_tables()

    def reset_tables(self) -> None:
        """Compute the tables again (a loader that builds modules without running their computations, as
        transformers' from_pretrained does, leaves them unset)."""
        # in float64 on the CPU whatever the default device: the same tables everywhere
        cpu = torch.device("cpu")
        inv_freq, attention_factor = inverse_frequencies(self.head_dim, self.base, self.scaling)
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64, device=cpu), inv_freq)
        cos, sin = (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()
        cos_full, sin_signed = full_tables(cos, sin, self.layout)
        device = self.cos_full.device if self.cos_full is not None and not self.cos_full.is_meta else cpu
        self.cos_full, self.sin_signed = cos_full.to(device), sin_signed.to(device)

    def full_tables(self, positions: torch.Tensor | None, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-width (cos, sin_signed) for `rope` on x [B, T, H, d]: [T, 1, d] or [B, T, 1, d]."""
        if positions is None:
            return self.cos_full[:seq_len, None], self.sin_signed[:seq_len, None]
        index = positions.clamp(min=0)
        return self.cos_full[index].unsqueeze(-2), self.sin_signed[index].unsqueeze(-2)


def inverse_frequencies(dim: int, base: float, scaling=None) -> tuple[torch.Tensor, float]:
    """(float64 inverse frequencies [dim/2], the factor cos and sin are multiplied by) for RoPE over `dim`
    channels, with `scaling` (a RopeScalingConfig) as transformers computes it for the same settings."""
    cpu = torch.device("cpu")  # explicit: callers may run under another default device (meta, for counting)
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=cpu) / dim
    kind = "none" if scaling is None else scaling.kind
    if kind == "ntk":  # NTK-aware: a larger base stretches the low frequencies, keeps the highest
        base = base * scaling.factor ** (dim / (dim - 2))
    inv_freq = 1.0 / base ** exponents
    if kind == "linear":
        return inv_freq / scaling.factor, 1.0
    if kind != "yarn":
        return inv_freq, 1.0
    factor = scaling.factor

    def correction_dim(rotations: float) -> float:  # the channel that turns `rotations` times over the context
        return dim * math.log(scaling.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device=cpu) - low) / max(high - low, 1e-3)).clamp(0, 1)
    extrapolated = 1 - ramp  # 1: the channel keeps its frequency, 0: it is interpolated by `factor`
    inv_freq = inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


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


"""Rotary position embedding in the two layouts found in the wild.

"half" rotates channel i with channel i + d/2 (Llama/HF, llama.cpp NEOX); "pairs" rotates adjacent
channels (2i, 2i+1) (GPT-J, DeepSeek, llama.cpp NORM). Exporters depend on which one a model uses.
"""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, base: float, layout: str):
        super().__init__()
        self.layout = layout
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        # Not saved with the weights: derived from the config.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def tables(self, positions: torch.Tensor | None, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for the given positions ([B, T], -1 marks padding) or for 0..seq_len-1."""
        if positions is None:
            return self.cos[:seq_len], self.sin[:seq_len]
        index = positions.clamp(min=0)
        return self.cos[index].unsqueeze(1), self.sin[index].unsqueeze(1)  # [B, 1, T, d/2]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate x [B, H, T, d] by cos/sin [T, d/2] or [B, 1, T, d/2]."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if layout == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)

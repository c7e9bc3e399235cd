"""Grouped-query attention (MHA / GQA / MQA through n_kv_heads) with optional QK-norm, sliding window
and attention-logit soft-cap."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.cache import LayerKV
from slmforge.model.norm import RMSNorm
from slmforge.model.rope import apply_rope


def sliding_window_mask(seq_len: int, window: int, device) -> torch.Tensor:
    """[T, T] boolean mask: query i sees keys j with i - window < j <= i."""
    i = torch.arange(seq_len, device=device)
    delta = i[:, None] - i[None, :]
    return (delta >= 0) & (delta < window)


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, T, S] mask from absolute positions (-1 = empty slot or padding)."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= k > q - window
    return allowed.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window, self.softcap, self.rope_layout = window, cfg.attn_logit_softcap, cfg.rope_layout
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: LayerKV | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope, self.rope_layout), apply_rope(k, *rope, self.rope_layout)

        if kv is not None:
            q_pos = kv.cache.step.positions
            k, v, k_pos = kv.update(k, v)
            mask, causal = position_mask(q_pos, k_pos, self.window), False
        elif self.window is not None and self.window < T:
            mask, causal = sliding_window_mask(T, self.window, x.device), False
        else:
            mask, causal = None, True
        y = self._attend(q, k, v, mask, causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _attend(self, q, k, v, mask, causal):
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                  enable_gqa=self.n_kv_heads != self.n_heads)
        # SDPA cannot soft-cap the logits: explicit attention, logits c*tanh(s/c) before masking.
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        scores = self.softcap * torch.tanh(scores / self.softcap)
        if mask is None:
            T, S = q.shape[2], k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(v.dtype)
        return weights @ v

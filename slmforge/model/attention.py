"""Grouped-query attention (MHA / GQA / MQA through n_kv_heads) with optional QK-norm, sliding window
and attention-logit soft-cap.

Speed notes (numbers in benchmarks/README.md): q, k and v come from one matmul against the three
weights concatenated at call time (the parameters stay separate, so names and optimizers see q_proj,
k_proj, v_proj; for decoding `slmforge.infer.kernels` sets `qkv_proj` to a fused copy); RoPE runs on the
[B, T, H, d] projections; masks are built once per forward and attention kind, not once per layer.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.cache import LayerKV
from slmforge.model.norm import RMSNorm
from slmforge.model.rope import rope


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


def memo_mask(masks: dict | None, key: tuple, build) -> torch.Tensor:
    """The mask under `key` in the per-forward memo the layers share (None: no memo), built on first use."""
    mask = None if masks is None else masks.get(key)
    if mask is None:
        mask = build()
        if masks is not None:
            masks[key] = mask
    return mask


def cache_mask(masks: dict | None, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, capacity: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The additive [B, 1, T, S] mask of a cached step (SDPA would convert a boolean one the same way on
    every call), memoised per attention kind and cache size."""

    def build():
        allowed = position_mask(q_pos, k_pos, window)
        return torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device).masked_fill_(~allowed, -math.inf)

    return memo_mask(masks, ("cache", window, capacity, k_pos.shape[1]), build)


def document_mask(documents: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, T, T] boolean mask of packed rows: query i sees key j of its own document (documents [B, T])
    with j <= i, and i - j < window when the layer slides."""
    i = torch.arange(documents.shape[1], device=documents.device)
    delta = i[:, None] - i[None, :]
    allowed = delta >= 0 if window is None else (delta >= 0) & (delta < window)
    return (allowed & (documents[:, :, None] == documents[:, None, :])).unsqueeze(1)


def window_mask(masks: dict | None, seq_len: int, window: int | None, device) -> torch.Tensor | None:
    """The mask of an uncached forward over the first `seq_len` tokens: per document where the forward packs
    several (`masks["documents"]`, set by the model), else the [T, T] sliding-window mask, or None where
    plain causal attention serves."""
    documents = None if masks is None else masks.get("documents")
    if documents is not None:
        return memo_mask(masks, ("documents", window, seq_len), lambda: document_mask(documents[:, :seq_len], window))
    if window is None or window >= seq_len:
        return None
    return memo_mask(masks, ("sliding", window, seq_len), lambda: sliding_window_mask(seq_len, window, device))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window, self.softcap, self.rope_layout = window, cfg.attn_logit_softcap, cfg.rope_layout
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.qkv_proj: nn.Module | None = None  # [q; k; v] fused for decoding (slmforge.infer.kernels)

    def cache_shapes(self) -> list[tuple[int, int]]:
        """What the KV cache keeps per token: keys and values, [n_kv_heads, head_dim] each."""
        return [(self.n_kv_heads, self.head_dim), (self.n_kv_heads, self.head_dim)]

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The q, k, v projections as one [(H + 2 H_kv) d, d_model] weight (and bias)."""
        weight = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        bias = None
        if self.q_proj.bias is not None:
            bias = torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias))
        return weight, bias

    def forward(self, x: torch.Tensor, rope_tables: tuple[torch.Tensor, torch.Tensor],
                kv: LayerKV | None = None, masks: dict | None = None) -> torch.Tensor:
        """x [B, T, d_model]; rope_tables from `RotaryEmbedding.full_tables`; `masks` is shared by the layers
        of one forward (a memo)."""
        B, T, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        decoding = self.qkv_proj is not None
        qkv = self.qkv_proj(x) if decoding else F.linear(x, *self.fused_qkv())
        qkv = qkv.view(B, T, H + 2 * H_kv, D)
        if self.q_norm is None and decoding:  # one rotation for q and k: fewer small ops per token
            q, k = rope(qkv[:, :, :H + H_kv], *rope_tables, self.rope_layout).split((H, H_kv), dim=2)
            v = qkv[:, :, H + H_kv:]
        else:
            q, k, v = qkv.split((H, H_kv, H_kv), dim=2)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rope(q, *rope_tables, self.rope_layout), rope(k, *rope_tables, self.rope_layout)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D] views

        if kv is not None:
            q_pos = kv.cache.step.positions
            k, v, k_pos = kv.update(k, v)
            mask, causal = cache_mask(masks, q_pos, k_pos, self.window, kv.capacity, q.dtype), False
        else:
            mask = window_mask(masks, T, self.window, x.device)
            causal = mask is None
        y = self._attend(q, k, v, mask, causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))

    def _attend(self, q, k, v, mask, causal):
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                  enable_gqa=self.n_kv_heads != self.n_heads)
        # SDPA cannot soft-cap the logits: explicit attention, logits c*tanh(s/c) before masking. The G query
        # heads sharing a kv head are stacked along the query axis, so k and v are read, not repeated.
        B, H, T, D = q.shape
        H_kv, S = k.shape[1], k.shape[2]
        groups = H // H_kv
        scores = (q.reshape(B, H_kv, groups * T, D) @ k.transpose(-2, -1)) / math.sqrt(D)
        scores = self.softcap * torch.tanh(scores / self.softcap)
        scores = scores.view(B, H_kv, groups, T, S)
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask.dim() == 4:  # [B, 1, T, S]
            mask = mask.unsqueeze(1)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
        weights = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(v.dtype)
        return (weights.view(B, H_kv, groups * T, S) @ v).view(B, H, T, D)

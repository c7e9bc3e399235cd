"""Multi-head latent attention (MLA, DeepSeek-V2/V3) in two forms: DeepSeek's ("decoupled": RMSNorm'd
latents, RoPE on separate query channels and on one RoPE key shared by all heads) and Axion1's
("whole_head": RoPE turns the whole up-projected query and key heads, no separate RoPE key).

Keys and values are up-projected from a small latent c_kv = W_dkv x, which is all the KV cache keeps (with
the rotated RoPE key in the decoupled form): kv_lora_rank + rope_head_dim numbers per token and layer.

Training (no cache) expands per-head keys and values and calls SDPA. Cached decoding in the decoupled form
absorbs the up-projection: q_nope . (W_uk c) = (W_uk^T q_nope) . c, so each query is mapped into latent
space once and scored against the cached latents, and the attention-weighted latent goes through W_uv
afterwards; per-head keys and values are never built. This stays exact with a kv_b_proj bias: its key
part adds a constant to a query's scores (softmax ignores it); its value part passes through weights that
sum to 1, so it is added to the output.
`absorb = False` expands the cached latents instead (the tests compare the two).

Keys and values may come in fewer heads than the queries (`model.n_kv_heads`, as in GQA: consecutive query
heads share one): CodeMind's up-projection makes a single key/value head for all of them. DeepSeek's form
has one per query head.

Parameters map 1:1 to transformers' DeepseekV3Attention: q_proj, q_a_proj, q_a_norm (q_a_layernorm),
q_b_proj, kv_a_proj (kv_a_proj_with_mqa, output [latent, rope key]), kv_a_norm (kv_a_layernorm),
kv_b_proj (per head [k_nope, v]), o_proj. rope_layout "pairs" equals HF's rope_interleave=True: HF
de-interleaves the rotated channels, a permutation shared by q and k that leaves their dot products unchanged.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.attention import cache_mask, window_mask
from slmforge.model.cache import LayerKV
from slmforge.model.norm import RMSNorm
from slmforge.model.rope import RotaryEmbedding, rope


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        a = cfg.mla
        self.n_heads, self.window, self.rope_layout = cfg.n_heads, window, cfg.rope_layout
        self.kv_heads = cfg.n_kv_heads
        self.decoupled = a.rope_mode == "decoupled"
        self.nope_dim, self.rope_dim, self.v_dim = a.qk_head_dim, a.rope_head_dim, a.v_head_dim
        self.kv_rank = a.kv_lora_rank
        self.scale = 1.0 / math.sqrt(a.qk_head_dim + a.rope_head_dim)  # rope_head_dim is 0 in whole_head
        self.absorb = True
        H, d, bias = cfg.n_heads, cfg.d_model, cfg.bias
        q_out = H * (a.qk_head_dim + a.rope_head_dim)  # per head [q_nope, q_rope]
        self.q_proj = self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        if a.q_lora_rank == 0:
            self.q_proj = nn.Linear(d, q_out, bias=bias)
        else:
            self.q_a_proj = nn.Linear(d, a.q_lora_rank, bias=bias)
            self.q_a_norm = RMSNorm(a.q_lora_rank, cfg.norm_eps) if a.latent_norm else None
            self.q_b_proj = nn.Linear(a.q_lora_rank, q_out, bias=bias)
        self.kv_a_proj = nn.Linear(d, a.kv_lora_rank + a.rope_head_dim, bias=bias)
        self.kv_a_norm = RMSNorm(a.kv_lora_rank, cfg.norm_eps) if a.latent_norm else None
        self.kv_b_proj = nn.Linear(a.kv_lora_rank, self.kv_heads * (a.qk_head_dim + a.v_head_dim), bias=bias)
        self.o_proj = nn.Linear(H * a.v_head_dim, d, bias=bias)
        # whole_head rotates cached keys at their own positions, which the caller's tables (the queries'
        # positions) do not cover: a private copy of the tables (buffers only, not saved).
        self.key_rope = None if self.decoupled else RotaryEmbedding(
            cfg.rope_dim(), cfg.max_seq_len, cfg.rope_base, cfg.rope_layout, cfg.rope_scaling)
        self.input_proj: nn.Module | None = None  # [q_in; kv_a] fused for decoding (slmforge.infer.kernels)

    def cache_shapes(self) -> list[tuple[int, int]]:
        """(heads, dim) of each cached store: the latent, and in the decoupled form the rotated RoPE key."""
        return [(1, self.kv_rank), (1, self.rope_dim)] if self.decoupled else [(1, self.kv_rank)]

    def _q_in(self) -> nn.Linear:
        return self.q_proj if self.q_proj is not None else self.q_a_proj

    def fused_input(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The two projections of x (query or query latent, kv latent) as one weight (and bias)."""
        q_in = self._q_in()
        weight = torch.cat((q_in.weight, self.kv_a_proj.weight))
        bias = None if q_in.bias is None else torch.cat((q_in.bias, self.kv_a_proj.bias))
        return weight, bias

    def forward(self, x: torch.Tensor, rope_tables: tuple[torch.Tensor, torch.Tensor],
                kv: LayerKV | None = None, masks: dict | None = None) -> torch.Tensor:
        """x [B, T, d_model]; rope_tables from `RotaryEmbedding.full_tables` (queries' positions); `masks`
        is the per-forward memo shared with the other layers."""
        B, T, _ = x.shape
        H, dn, dr = self.n_heads, self.nope_dim, self.rope_dim
        q_in = self._q_in()
        if self.input_proj is None:
            q, latent = q_in(x), self.kv_a_proj(x)
        else:  # one matrix-vector product for both projections of x
            q, latent = self.input_proj(x).split((q_in.out_features, self.kv_rank + dr), -1)
        if self.q_b_proj is not None:
            if self.q_a_norm is not None:
                q = self.q_a_norm(q)
            q = self.q_b_proj(q)
        q = q.view(B, T, H, dn + dr)
        c_kv, k_rope = latent.split((self.kv_rank, dr), -1)
        if self.kv_a_norm is not None:
            c_kv = self.kv_a_norm(c_kv)
        if self.decoupled:
            q_nope, q_rope = q.split((dn, dr), -1)
            q_rope = rope(q_rope, *rope_tables, self.rope_layout)
            k_rope = rope(k_rope.unsqueeze(2), *rope_tables, self.rope_layout)  # [B, T, 1, dr]: one shared head
        else:
            q = rope(q, *rope_tables, self.rope_layout)
        latent_attention = kv is not None and self.decoupled and self.absorb
        if not latent_attention:  # per-head queries [B, H, T, qk] for SDPA
            q = (torch.cat((q_nope, q_rope), -1) if self.decoupled else q).transpose(1, 2)

        if kv is None:
            k, v = self._expand(c_kv, k_rope if self.decoupled else rope_tables)
            mask = window_mask(masks, T, self.window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        else:
            if self.decoupled:
                c_all, k_rope_all, k_pos = kv.update(c_kv.unsqueeze(1), k_rope.transpose(1, 2))
            else:
                c_all, k_pos = kv.update(c_kv.unsqueeze(1))
            mask = cache_mask(masks, kv.cache.step.positions, k_pos, self.window, kv.capacity, latent.dtype)
            if latent_attention:
                y = self._absorbed(q_nope, q_rope, c_all, k_rope_all, mask)
            else:
                # whole_head cannot absorb: RoPE sits between W_uk and the dot product, so the cached
                # latents are expanded, and rotated at their own positions, at every step.
                rot = k_rope_all.transpose(1, 2) if self.decoupled else self.key_rope.full_tables(k_pos, k_pos.shape[1])
                k, v = self._expand(c_all[:, 0], rot)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, H * self.v_dim)
        return self.o_proj(y)

    def _expand(self, c_kv: torch.Tensor, rot) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys and values [B, H, S, dim] from latents c_kv [B, S, r]. `rot`: decoupled, the rotated
        shared key [B, S, 1, dr]; whole_head, the RoPE tables of the keys' positions."""
        B, S, _ = c_kv.shape
        G, rep = self.kv_heads, self.n_heads // self.kv_heads
        k, v = self.kv_b_proj(c_kv).view(B, S, G, -1).split((self.nope_dim, self.v_dim), -1)
        if self.decoupled:
            k = torch.cat((k, rot.expand(-1, -1, G, -1)), -1)
        else:
            k = rope(k, *rot, self.rope_layout)
        if rep > 1:  # each key/value head serves `rep` consecutive query heads
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, mask) -> torch.Tensor:
        """Attention in latent space. q_nope/q_rope [B, T, H, d] (q_rope rotated), cached c_kv [B, 1, S, r]
        and k_rope [B, 1, S, dr], mask [B, 1, T, S] additive; returns [B, H, T, v_dim]."""
        B, T, H, _ = q_nope.shape
        S, r, dn, G = c_kv.shape[2], self.kv_rank, self.nope_dim, self.kv_heads
        w = self.kv_b_proj.weight.view(G, dn + self.v_dim, r)
        w_uk, w_uv = w[:, :dn], w[:, dn:]  # views: no copy of the weights
        # query heads grouped by the key/value head they share: [B, G, (H/G)·T, dn] against w_uk [G, dn, r]
        grouped = q_nope.transpose(1, 2).reshape(B, G, -1, dn)
        q_latent = torch.matmul(grouped, w_uk).mul_(self.scale).view(B, H, T, r)
        q_rot = (q_rope * self.scale).transpose(1, 2).reshape(B, 1, H * T, -1)
        # The heads share one latent "key head": stacked along the query axis, it is read once for all.
        scores = torch.matmul(q_latent.view(B, 1, H * T, r), c_kv.mT)
        scores.add_(torch.matmul(q_rot, k_rope.mT)).view(B, H, T, S).add_(mask)
        # Padding queries see no key: their all -inf rows give NaN, zeroed like SDPA does.
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).nan_to_num_(0.0).to(c_kv.dtype)
        y = torch.matmul(torch.matmul(weights, c_kv).view(B, G, -1, r), w_uv.mT)  # [B, G, (H/G)·T, v_dim]
        if self.kv_b_proj.bias is not None:  # each group's value bias, broadcast over its heads (no copy)
            y = y + self.kv_b_proj.bias.view(G, 1, -1)[:, :, dn:]
        return y.view(B, H, T, -1)

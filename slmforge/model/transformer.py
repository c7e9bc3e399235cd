"""The decoder: token embedding, pre-norm blocks of attention and feed-forward, final norm, LM head.

`forward(tokens, positions, cache)` returns logits and a dict of auxiliary outputs; losses belong to the
trainer. Nothing here knows about files, devices or optimizers.

Generation (a forward with a cache and autograd off) fuses q/k/v and gate/up into one matrix each, so a
decoding step runs 4 matrix-vector products per layer instead of 7. The fused matrices are copies (for
shard-40m +63% of the weights' memory, 138 MB in fp32, while generating), rebuilt when a weight changes
(tracked by storage and version counter) and dropped by the next forward with autograd on or by
`drop_generation_weights()`. One-token products are split over the CPU threads (see `decode_linear`).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.attention import Attention
from slmforge.model.cache import KVCache
from slmforge.model.ffn import SwiGLU, decode_linear
from slmforge.model.norm import RMSNorm
from slmforge.model.rope import RotaryEmbedding


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, window)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.d_ff, cfg.bias)

    def forward(self, x, rope, kv=None, masks=None, gen_splits=None):
        x = x + self.attn(self.attn_norm(x), rope, kv, masks, gen_splits)
        return x + self.ffn(self.ffn_norm(x), gen_splits)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_base, cfg.rope_layout)
        self.layers = nn.ModuleList(Block(cfg, w) for w in cfg.layer_windows())
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        self._has_generation_weights = False

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2L) (GPT-2)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                p.normal_(0.0, std)

    def new_cache(self, batch_size: int, max_len: int, rollback_margin: int = 16) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` tokens, in the model's dtype."""
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={self.cfg.max_seq_len}")
        ref = self.embed.weight
        return KVCache(self.cfg.layer_windows(), batch_size, max_len, self.cfg.n_kv_heads, self.cfg.head_dim,
                       dtype=ref.dtype, device=ref.device, rollback_margin=rollback_margin)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> tuple[torch.Tensor, dict]:
        """tokens [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only).

        positions [B, T] are absolute positions (-1 marks padding); by default 0..T-1, or, with a
        cache, the continuation of each cached sequence.
        """
        T = tokens.shape[1]
        if cache is not None:
            if positions is None:
                positions = cache.next_positions(T)
            cache.begin(positions)
        elif T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        rope = self.rope.full_tables(positions, T)
        gen_splits = None  # generation: the weight blocks of one-token products (see decode_linear)
        if torch.is_grad_enabled():
            if self._has_generation_weights:
                self.drop_generation_weights()
        elif cache is not None:
            gen_splits = torch.get_num_threads() if tokens.device.type == "cpu" else 1
            self._has_generation_weights = True
        masks = {}  # built by the first layer of each attention kind, reused by the others
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache.layers[i] if cache is not None else None, masks, gen_splits)
        if last_only:
            x = x[:, -1:]
        logits = self.logits(self.norm(x), gen_splits)
        return logits, {}

    def drop_generation_weights(self) -> None:
        """Free the fused weight copies that generation keeps between steps (rebuilt on demand)."""
        for layer in self.layers:
            layer.attn.generation_weights.clear()
            layer.ffn.generation_weights.clear()
        self._has_generation_weights = False

    def logits(self, h: torch.Tensor, gen_splits: int | None = None) -> torch.Tensor:
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        if gen_splits is not None:
            logits = decode_linear(h, head, None, gen_splits)
        else:
            logits = F.linear(h, head)
        cap = self.cfg.final_logit_softcap
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

"""The decoder: token embedding, pre-norm blocks of attention and feed-forward, final norm, LM head.

Each part is a config choice that mixes with the others: attention is GQA or MLA, the feed-forward is a
dense SwiGLU or routed experts (per layer: the first k may stay dense), the residual connection is a sum
or an attention residual, and D multi-token-prediction modules may follow the last layer.

`forward(tokens, positions, cache)` returns logits and a dict of auxiliary outputs (MTP logits, expert
loads, the balance loss, hidden states on request); losses belong to the trainer. Nothing here knows
about files, devices or optimizers.

Decoding uses the same forward with a cache (see `slmforge.model.decoding` for the contract); the
kernels it runs fastest with are chosen outside the model, by `slmforge.infer.kernels`.
"""

import math

import torch
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.attention import Attention
from slmforge.model.cache import KVCache
from slmforge.model.ffn import SwiGLU
from slmforge.model.head import head_logits
from slmforge.model.mla import MLAttention
from slmforge.model.moe import MoE
from slmforge.model.mtp import MTPModule
from slmforge.model.norm import RMSNorm
from slmforge.model.residual import make_residual
from slmforge.model.rope import RotaryEmbedding


class Block(nn.Module):
    """One layer: attention and feed-forward sublayers, each behind its own RMSNorm."""

    def __init__(self, cfg: ModelConfig, index: int, window: int | None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MLAttention(cfg, window) if cfg.attention == "mla" else Attention(cfg, window)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.layer_is_moe(index) else SwiGLU(cfg.d_model, cfg.d_ff, cfg.bias)

    def attention(self, h, rope_tables, kv=None, masks=None) -> torch.Tensor:
        return self.attn(self.attn_norm(h), rope_tables, kv, masks)

    def feed_forward(self, h, moe_stats: list | None = None) -> torch.Tensor:
        if not isinstance(self.ffn, MoE):
            return self.ffn(self.ffn_norm(h))
        out, stats = self.ffn(self.ffn_norm(h))
        if moe_stats is not None:
            moe_stats.append(stats)
        return out

    def forward(self, x, rope_tables, kv=None, masks=None, moe_stats=None) -> torch.Tensor:
        """The block with plain additive residuals (how MTP modules use it)."""
        x = x + self.attention(x, rope_tables, kv, masks)
        return x + self.feed_forward(x, moe_stats)


def _first_positions(rope_tables: tuple[torch.Tensor, torch.Tensor], n: int):
    """RoPE tables ([T, 1, d] or [B, T, 1, d]) cut to the first n positions."""
    return tuple(t[:n] if t.dim() == 3 else t[:, :n] for t in rope_tables)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.rope_dim(), cfg.max_seq_len, cfg.rope_base, cfg.rope_layout, cfg.rope_scaling)
        self.layers = nn.ModuleList(Block(cfg, i, w) for i, w in enumerate(cfg.layer_windows()))
        self.residual = make_residual(cfg)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # an MTP block attends like the decoder's last layer (globally, unless every layer slides, as in CodeMind)
        mtp_window = cfg.layer_windows()[-1]
        self.mtp = nn.ModuleList(MTPModule(cfg, Block(cfg, cfg.n_layers + k, mtp_window)) for k in range(cfg.mtp_depth))
        self.head_proj: nn.Module | None = None  # the head for decoding (slmforge.infer.kernels)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2L) (GPT-2); norm gains
        1; biases 0; the residual module's own init (attention-residual queries start at zero)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.startswith("residual."):  # its own init below; skipped so the draws match mode "add"
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                p.normal_(0.0, std)
        self.residual.reset_parameters()

    def moe_layers(self) -> list[MoE]:
        """Every routed-expert feed-forward, in the order of `aux["expert_load"]` rows."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_routing_biases(self, expert_load: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing, after an optimizer step: `expert_load` [n_moe_layers, n_experts]
        is the tokens each expert received over that step (summed over micro-batches and ranks)."""
        for moe, load in zip(self.moe_layers(), expert_load):
            moe.update_bias(load)

    def cache_layout(self, mtp: bool = False) -> list[tuple[int | None, list[tuple[int, int]]]]:
        """(window, store shapes) per attention layer: of the decoder, or of the MTP modules' blocks."""
        if mtp:
            return [(m.block.attn.window, m.block.attn.cache_shapes()) for m in self.mtp]
        return [(layer.attn.window, layer.attn.cache_shapes()) for layer in self.layers]

    def new_cache(self, batch_size: int, max_len: int, rollback_margin: int = 16, mtp: bool = False) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` tokens, in the model's dtype
        (`mtp=True`: for the MTP modules' blocks, used when drafting)."""
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={self.cfg.max_seq_len}")
        ref = self.embed.weight
        return KVCache(self.cache_layout(mtp), batch_size, max_len, dtype=ref.dtype, device=ref.device,
                       rollback_margin=rollback_margin)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False, return_hidden: bool = False,
                documents: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """tokens [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only), aux.

        positions [B, T] are absolute positions (-1 marks padding); by default 0..T-1, or, with a cache,
        the continuation of each cached sequence. documents [B, T] (no cache) packs several sequences in a
        row: a token attends only to earlier tokens of its own document, and positions count from 0 in
        each. aux holds "mtp_logits" (in training mode without a
        cache: a list, depth k's [B, T - k, V] predicting token i + k + 1), "expert_load"
        [n_moe_layers, n_experts], "expert_dropped" (routed pairs not computed: 0) and "balance_loss" for
        MoE models, and "hidden" (the final hidden state
        before the norm, [B, T, d]) when asked.
        """
        T = tokens.shape[1]
        if cache is not None:
            if positions is None:
                positions = cache.next_positions(T)
            cache.begin(positions)
        elif T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        masks = {}  # built by the first layer of each attention kind, reused by the others
        if documents is not None:
            if cache is not None or positions is None:
                raise ValueError("packed documents need their positions and no cache")
            masks["documents"] = documents
        rope = self.rope.full_tables(positions, T)
        moe_stats: list[dict] = []
        res = self.residual
        state = res.begin(self.embed(tokens))
        for i, layer in enumerate(self.layers):
            kv = cache.layers[i] if cache is not None else None
            res.add(state, i, 0, layer.attention(res.input(state, i, 0), rope, kv, masks))
            res.add(state, i, 1, layer.feed_forward(res.input(state, i, 1), moe_stats))
        x = res.output(state)
        aux = {}
        if self.mtp and self.training and cache is None:
            aux["mtp_logits"] = self._mtp_logits(x, tokens, rope, masks, moe_stats)
        if moe_stats:
            aux["expert_load"] = torch.stack([s["load"] for s in moe_stats])
            aux["expert_dropped"] = sum(s["dropped"] for s in moe_stats)
            losses = [s["balance_loss"] for s in moe_stats if "balance_loss" in s]
            if losses:
                aux["balance_loss"] = sum(losses) / len(losses)
        if return_hidden:
            aux["hidden"] = x
        if last_only:
            x = x[:, -1:]
        return self.logits(self.norm(x)), aux

    def _mtp_logits(self, hidden, tokens, rope, masks, moe_stats) -> list[torch.Tensor]:
        out = []
        for k, module in enumerate(self.mtp, start=1):
            n = tokens.shape[1] - k
            if n <= 0:
                break
            hidden = module(hidden[:, :n], self.embed(tokens[:, k:]), _first_positions(rope, n), None, masks,
                            moe_stats)
            out.append(self.logits(module.norm(hidden)))
        return out

    def draft(self, hidden: torch.Tensor, next_tokens: torch.Tensor, cache: KVCache,
              positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first MTP module at positions i (its own `cache`, from `new_cache(..., mtp=True)`): hidden
        [B, T, d] of the decoder at i and tokens [B, T] at i + 1 -> (logits [B, T, V] for tokens i + 2, its
        hidden state)."""
        if not self.mtp:
            raise ValueError("this model has no MTP module to draft with (model.mtp_depth = 0)")
        T = next_tokens.shape[1]
        if positions is None:
            positions = cache.next_positions(T)
        cache.begin(positions)
        module = self.mtp[0]
        h = module(hidden, self.embed(next_tokens), self.rope.full_tables(positions, T), cache.layers[0], {})
        return self.logits(module.norm(h)), h

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return head_logits(h, self.head_weight(), self.cfg.final_logit_softcap, self.head_proj)

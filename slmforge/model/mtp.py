"""Multi-token prediction (DeepSeek-V3): D sequential modules on top of the decoder.

Module k combines the previous depth's hidden state at position i with the embedding of token i + k and
runs one more transformer block, whose output (through the shared final head) predicts token i + k + 1:
    h' = proj([RMSNorm(Emb(t_(i+k))); RMSNorm(h^(k-1)_i)]),  h^k = Block_k(h'),  logits = head(RMSNorm(h^k))
The embedding and the head are the main model's. The order [embedding; hidden] is DeepSeek-V3's released
code (its paper writes the two the other way round); importers of other layouts swap the halves of `proj`.
At inference the first module drafts the token after next for self-speculative decoding.
"""

import torch
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.embed_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.hidden_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = block
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)  # before the shared head

    def forward(self, hidden: torch.Tensor, next_embedding: torch.Tensor, rope_tables, kv=None, masks=None,
                moe_stats=None) -> torch.Tensor:
        """hidden [B, T, d] of the previous depth at positions i, next_embedding [B, T, d] of tokens i + k
        -> this depth's hidden state [B, T, d] (before `norm`)."""
        x = self.proj(torch.cat((self.embed_norm(next_embedding), self.hidden_norm(hidden)), dim=-1))
        return self.block(x, rope_tables, kv, masks, moe_stats)

"""A small stand-in model with every kind of parameter the optimizer grouping distinguishes, and a
training loop for it, shared by the optimizer tests."""

import torch
from torch import nn


class Attn(nn.Module):
    def __init__(self, d, bias):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=bias), nn.Linear(d, d // 2, bias=bias)
        self.v_proj, self.o_proj = nn.Linear(d, d // 2, bias=bias), nn.Linear(d, d, bias=bias)
        self.q_norm, self.k_norm = nn.RMSNorm(4), nn.RMSNorm(4)


class Experts(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.up_proj = nn.Parameter(torch.randn(n, 2 * d, d))
        self.gate = nn.Linear(d, 1, bias=False)  # a [1, d] matrix: a vector in disguise
        self.register_buffer("routing_bias", torch.zeros(n))


class FFN(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=False)


class Block(nn.Module):
    def __init__(self, d, moe):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = Attn(d, bias=True)
        self.ffn = Experts(d, 3) if moe else FFN(d)


class TinyModel(nn.Module):
    def __init__(self, d=8, vocab=32, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d, moe=False), Block(d, moe=True)])
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight
        self.layers[0].attn.q_norm.weight.requires_grad_(False)  # frozen: must be left out


def train_tiny(model, opts, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 32, (2, 5), generator=gen)
        h = model.embed(x)
        for block in model.layers:
            a = block.attn
            h = h + a.o_proj(a.q_proj(block.attn_norm(h)) + a.q_norm.weight.sum() + a.k_norm.weight.sum())
            h = h + a.k_proj(h).sum() + a.v_proj(h).sum()
            if isinstance(block.ffn, FFN):
                f = block.ffn
                h = h + f.down_proj(f.gate_proj(block.ffn_norm(h)) * f.up_proj(h))
            else:
                h = h + torch.einsum("btd,eod->bto", h, block.ffn.up_proj).mean(-1, keepdim=True) + block.ffn.gate(h)
        loss = model.lm_head(model.norm(h)).logsumexp(-1).mean()
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)


def group_table(optimizers):
    return {g["name"]: (g["param_names"], g["weight_decay"], g["lr"]) for o in optimizers for g in o.param_groups}

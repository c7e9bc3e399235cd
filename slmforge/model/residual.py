"""Residual connections: the plain sum, or attention residuals (Kimi Team, arXiv 2603.15031).

A plain residual gives every sublayer the running sum h + f(h) of all earlier outputs with unit weights,
so the hidden state grows with depth and each layer's share shrinks (PreNorm dilution). Attention
residuals let each aggregation point choose: its input is h = Σ_i α_i·v_i, α = softmax_i(w·RMSNorm(v_i)),
with one learned pseudo-query w per point, v_0 the token embedding and v_i earlier outputs. Queries start
at zero, so every aggregation starts as the uniform average of its sources (paper §5: required for
stability). The aggregation is per position, so it runs unchanged on one decoded token.

Modes, driven by the Transformer through begin / input / add / output (L layers, d = d_model):
  add               h + f(h); no parameters, one tensor add per sublayer.
  attnres_full      (paper §3.1) 2L+1 points: before each attention, before each FFN, and the final hidden
                    state (before the final norm). Sources: the embedding and every earlier sublayer
                    output, attention and FFN outputs separately.
  attnres_block     (paper §3.2, Fig. 2) the layers form `residual_blocks` = N blocks of consecutive layers;
                    the sublayer outputs of a block are summed into a partial sum. Sources: [embedding,
                    finished block sums..., the partial sum when non-empty]; the same 2L+1 points; the final
                    point sees [embedding, all N block sums]. N = 1: [embedding, sum of all earlier
                    outputs]. N = L: full mode with each layer's attention and FFN outputs merged into one
                    source. The paper cuts blocks of S = L/N layers and lets "the last block contain the
                    remaining layers", which can make more than N blocks; here there are exactly N, as even
                    as possible (`block_sizes`). The paper counts sublayers and may cut between
                    attention and FFN; here blocks hold whole layers.
  attnres_codemind  CodeMind (github B4K2/codemind: model/codemind.py `_forward_block_attnres`,
                    model/components/attn_residuals.py, model/blocks/transformer_block.py): one query per
                    layer, applied before attention only. Layer l reads h = agg_l([embedding, finished
                    block sums..., partial sum when non-empty]), then keeps plain residuals inside:
                    u = h + attn(attn_norm(h)), y = u + ffn(ffn_norm(u)). The whole layer output y (its
                    input h included) is added to the partial sum; after every L/N layers, except the last, the
                    partial sum becomes a finished block. The final hidden state is the last layer's y (no
                    final aggregation). CodeMind requires N to divide L.

Key norm: in the paper every point has its own RMSNorm with a learnable gain ("one RMSNorm and one
pseudo-query vector per layer", §5; `attn_res_norm` / `mlp_res_norm` in Fig. 2), not shared; it is kept
although w·(g ⊙ k̂) = (w ⊙ g)·k̂ makes it redundant with the query. CodeMind's key norm has no weight.

Parameters (all under `residual.`, vectors or rows of vectors, which the optimizer keeps out of Muon):
  full, block  attn_queries [L, d], ffn_queries [L, d], final_query [d] (init 0) and attn_key_gains,
               ffn_key_gains, final_key_gain of the same shapes (init 1): 2·(2L+1)·d parameters.
  codemind     queries.{l} [d] (init 0), one name per CodeMind `attn_res_operators.{l}.pseudo_query`
               (`slmforge.export.names.codemind_names`): L·d parameters.

Cost: a source's logits against every query of the forward are one [B·T, d] x [d, points] product in
float32 when it is created; each point then only softmaxes a column per source and accumulates
Σ α_i·v_i source by source in float32, so autograd keeps references to the sources, not a stacked
[sources, B, T, d] copy per point (full mode, 12 layers: 75 MiB saved for backward instead of 726).
Aggregates and block sums are in the embedding's dtype, the residual stream's (float32 under autocast).
"""

import itertools
from types import SimpleNamespace

import torch
from torch import nn

from slmforge.config import ModelConfig


def block_sizes(n_layers: int, n_blocks: int) -> list[int]:
    """Layers per block of attnres_block: as even as possible, the first n_layers % n_blocks one larger
    (12 layers in 8 blocks: 2, 2, 2, 2, 1, 1, 1, 1)."""
    size, extra = divmod(n_layers, n_blocks)
    return [size + 1] * extra + [size] * (n_blocks - extra)


def _logits(v: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """w_p · RMSNorm(v) for every row w_p of w: v [B, T, d], w [P, d] -> [B, T, P], in float32."""
    if torch.is_autocast_enabled(v.device.type):  # autocast would run the product in bf16
        with torch.autocast(v.device.type, enabled=False):
            return _logits(v, w, eps)
    v32 = v.float()
    rstd = (torch.linalg.vector_norm(v32, dim=-1, keepdim=True).square() / v.shape[-1] + eps).rsqrt()
    return (v32 @ w.t()) * rstd


def _begin(embedding: torch.Tensor, w: torch.Tensor, eps: float) -> SimpleNamespace:
    """Per-forward state: finished sources and their logits, the open partial sum, the stream's dtype."""
    return SimpleNamespace(w=w, values=[embedding], logits=[_logits(embedding, w, eps)], partial=None,
                           dtype=embedding.dtype, h=None)


def _aggregate(state: SimpleNamespace, point: int, eps: float) -> torch.Tensor:
    """Σ_i softmax_i(logits)·v_i over the finished sources and the partial sum (if any), for one point."""
    values, logits = state.values, [lg[..., point] for lg in state.logits]
    if state.partial is not None:
        values = values + [state.partial]
        logits.append(_logits(state.partial, state.w[point:point + 1], eps)[..., 0])
    alpha = torch.softmax(torch.stack(logits), dim=0).unsqueeze(-1)  # [n, B, T, 1]
    out = alpha[0] * values[0]  # float32 like alpha, whatever the sources' dtype
    for a, v in zip(alpha[1:], values[1:]):
        out.addcmul_(a, v)
    return out.to(state.dtype)


class Residual(nn.Module):
    """Common interface. Per forward: state = begin(embedding); for each layer l and sublayer s (0:
    attention, 1: FFN): f(input(state, l, s)) is passed to add(state, l, s, ...); output(state) is the
    hidden state before the final norm. Calls must come in that order."""

    def begin(self, embedding: torch.Tensor) -> object:
        raise NotImplementedError

    def input(self, state, layer: int, sublayer: int) -> torch.Tensor:
        raise NotImplementedError

    def add(self, state, layer: int, sublayer: int, output: torch.Tensor) -> None:
        raise NotImplementedError

    def output(self, state) -> torch.Tensor:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Queries to zero, key-norm gains to one."""


class AddResidual(Residual):
    """h + f(h); the state is a one-element list holding the running sum."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()

    def begin(self, embedding):
        return [embedding]

    def input(self, state, layer, sublayer):
        return state[0]

    def add(self, state, layer, sublayer, output):
        state[0] = state[0] + output

    def output(self, state):
        return state[0]


class _KimiResidual(Residual):
    """The paper's parameters: a query and a key-norm gain per point; point 2l + s, final point 2L."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        L, d = cfg.n_layers, cfg.d_model
        self.n_layers, self.eps = L, cfg.norm_eps
        self.attn_queries = nn.Parameter(torch.zeros(L, d))
        self.ffn_queries = nn.Parameter(torch.zeros(L, d))
        self.final_query = nn.Parameter(torch.zeros(d))
        self.attn_key_gains = nn.Parameter(torch.ones(L, d))
        self.ffn_key_gains = nn.Parameter(torch.ones(L, d))
        self.final_key_gain = nn.Parameter(torch.ones(d))

    @torch.no_grad()
    def reset_parameters(self):
        for q in (self.attn_queries, self.ffn_queries, self.final_query):
            q.zero_()
        for g in (self.attn_key_gains, self.ffn_key_gains, self.final_key_gain):
            g.fill_(1.0)

    def _point_weights(self) -> torch.Tensor:
        """[2L+1, d] float32: query ⊙ key gain of every point, in point order."""
        def interleave(attn, ffn, final):
            return torch.cat([torch.stack([attn, ffn], 1).flatten(0, 1), final[None]])

        q = interleave(self.attn_queries, self.ffn_queries, self.final_query)
        return (q * interleave(self.attn_key_gains, self.ffn_key_gains, self.final_key_gain)).float()

    def begin(self, embedding):
        return _begin(embedding, self._point_weights(), self.eps)

    def input(self, state, layer, sublayer):
        return _aggregate(state, 2 * layer + sublayer, self.eps)

    def output(self, state):
        return _aggregate(state, 2 * self.n_layers, self.eps)


class FullAttnRes(_KimiResidual):
    """Every sublayer output is a source of every later point."""

    def add(self, state, layer, sublayer, output):
        state.values.append(output)
        state.logits.append(_logits(output, state.w, self.eps))


class BlockAttnRes(_KimiResidual):
    """Sublayer outputs summed per block; finished blocks are sources, and so is the open partial sum."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        ends = itertools.accumulate(block_sizes(cfg.n_layers, cfg.residual_blocks))
        self.block_ends = frozenset(end - 1 for end in ends)  # last layer of each block

    def add(self, state, layer, sublayer, output):
        state.partial = output.to(state.dtype) if state.partial is None else state.partial + output
        if sublayer == 1 and layer in self.block_ends:
            state.values.append(state.partial)
            state.logits.append(_logits(state.partial, state.w, self.eps))
            state.partial = None


class CodeMindAttnRes(Residual):
    """CodeMind's variant (see the module docstring); `state.h` is the layer's inner residual stream."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        L, N = cfg.n_layers, cfg.residual_blocks
        if L % N:
            raise ValueError(f"attnres_codemind needs model.residual_blocks ({N}) to divide model.n_layers ({L})")
        self.n_layers, self.eps = L, cfg.norm_eps
        self.queries = nn.ParameterList(torch.zeros(cfg.d_model) for _ in range(L))
        self.block_ends = frozenset(range(L // N - 1, L - 1, L // N))  # no boundary after the last layer

    @torch.no_grad()
    def reset_parameters(self):
        for q in self.queries:
            q.zero_()

    def begin(self, embedding):
        return _begin(embedding, torch.stack(list(self.queries)).float(), self.eps)

    def input(self, state, layer, sublayer):
        if sublayer == 0:
            state.h = _aggregate(state, layer, self.eps)
        return state.h

    def add(self, state, layer, sublayer, output):
        state.h = state.h + output
        if sublayer == 1:  # state.h is the layer's output: its input plus both contributions
            state.partial = state.h if state.partial is None else state.partial + state.h
            if layer in self.block_ends:
                state.values.append(state.partial)
                state.logits.append(_logits(state.partial, state.w, self.eps))
                state.partial = None

    def output(self, state):
        return state.h


_KINDS = {"add": AddResidual, "attnres_full": FullAttnRes, "attnres_block": BlockAttnRes,
          "attnres_codemind": CodeMindAttnRes}


def make_residual(cfg: ModelConfig) -> Residual:
    """The residual module for cfg.residual."""
    return _KINDS[cfg.residual](cfg)

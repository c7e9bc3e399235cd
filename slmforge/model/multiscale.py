"""The multi-scale byte transformer (AXL-Code): parallel causal stacks over the byte sequence at several
resolutions, cross-scale attention between them, and a per-byte gated fusion before the tied head.

Layout. Stack k runs `layers_per_scale` pre-norm decoder blocks (the decoder's `Block`) over the bytes
downsampled by s = scales[k]: s adjacent byte embeddings concatenated and projected d*s -> d (scale 1
reads the embeddings as they are). A cross-scale round follows block ceil((r + 1) * L / C) of every stack
(L = layers_per_scale, C = cross_layers; for 6 and 3: after blocks 2, 4 and 6): one attention per ordered
pair of scales (a, b), queries from a, keys and values from b, every pair reading the states from before
the round and stack a adding the sum over b. Then each stack is upsampled to bytes by repetition and
[α_1 .. α_n] = softmax(W [H_1; ...; H_n]) per byte mixes them; final RMSNorm, tied head, soft-cap.

Causality. The output at byte i predicts byte i + 1, so it may read bytes <= i only. Coarse position j of
scale s pools bytes js - s + 1 .. js (the sequence shifted right by s - 1 with zeros before grouping, as in
the Hourglass Transformer), so its horizon, the last byte it covers, is js. By induction every state
depends on bytes up to its horizon only: a stack's self-attention is causal in j; a cross-scale query of
horizon h sees the keys of horizon <= h (the mask is written in bytes); byte i reads coarse position
floor(i / s), of horizon s * floor(i / s) <= i. Position 0 (horizon 0) is visible to every query, so no
row is fully masked. RoPE: a stack's self-attention rotates by the coarse index j; cross-scale attention
rotates queries and keys by their horizons, so the relative angle counts bytes.

Decoding. No state depends on later bytes, so a position's states are final once computed, and the cache
keeps them: per scale a KV cache (its self-attention layers, then the keys and values each cross-scale
round reads from it), plus the bytes seen (a new coarse position pools up to s - 1 earlier ones) and the
stacks' outputs (later bytes read them when upsampling). Byte p adds position p / s to scale s when s
divides p; the other scales do no work for it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.attention import Attention
from slmforge.model.cache import KVCache, LayerKV
from slmforge.model.head import head_logits
from slmforge.model.norm import RMSNorm
from slmforge.model.rope import RotaryEmbedding, rope
from slmforge.model.transformer import Block


class CrossScaleAttention(nn.Module):
    """Queries from one scale's states, keys and values from another's, each side behind its own RMSNorm;
    the projections, QK-norm and attention kernel are the decoder's `Attention`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.query_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.context_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, None)

    def keys_values(self, context: torch.Tensor, rope_tables) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, S, d] -> keys and values [B, H_kv, S, head_dim], keys rotated by `rope_tables`."""
        a, (B, S, _) = self.attn, context.shape
        c = self.context_norm(context)
        k = a.k_proj(c).view(B, S, a.n_kv_heads, a.head_dim)
        v = a.v_proj(c).view(B, S, a.n_kv_heads, a.head_dim)
        if a.k_norm is not None:
            k = a.k_norm(k)
        return rope(k, *rope_tables, a.rope_layout).transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, rope_tables, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        a, (B, T, _) = self.attn, x.shape
        q = a.q_proj(self.query_norm(x)).view(B, T, a.n_heads, a.head_dim)
        if a.q_norm is not None:
            q = a.q_norm(q)
        q = rope(q, *rope_tables, a.rope_layout).transpose(1, 2)
        y = a._attend(q, k, v, mask, False)
        return a.o_proj(y.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))


@dataclass
class ScaleStep:
    """The positions of one scale that a forward computes."""

    h: torch.Tensor  # [B, n, d] their inputs: pooled byte embeddings
    self_rope: tuple  # RoPE tables at the coarse indices (the stack's self-attention)
    cross_rope: tuple  # RoPE tables at the horizons (cross-scale attention)
    horizon: torch.Tensor  # [n] (whole sequence) or [B, n] (decoding, -1 = padding): last byte covered
    coarse: torch.Tensor | None = None  # decoding: [B, n] coarse indices, -1 = padding


class MultiScaleCache:
    """Decoding state of `batch_size` sequences of up to `max_len` bytes (see the module docstring)."""

    def __init__(self, model: "MultiScaleTransformer", batch_size: int, max_len: int, dtype, device):
        self.batch_size, self.max_len = batch_size, max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.bytes = torch.zeros(batch_size, max_len + 1, dtype=torch.long, device=device)  # last: scratch
        shapes = model.stacks[0][0].attn.cache_shapes()
        n_stores = model.cfg.multiscale.layers_per_scale + len(model.cross) * (len(model.scales) - 1)
        self.scales, self.outputs, self.scales_s = [], [], list(model.scales)
        for s in model.scales:
            n_positions = -(-max_len // s)
            self.scales.append(KVCache([(None, shapes)] * n_stores, batch_size, n_positions, dtype, device))
            self.outputs.append(torch.zeros(batch_size, n_positions + 1, model.cfg.d_model, dtype=dtype,
                                            device=device))  # the last row is scratch for padding

    def next_positions(self, n_tokens: int) -> torch.Tensor:
        """Positions [B, n_tokens] that continue every sequence."""
        return self.lengths[:, None] + torch.arange(n_tokens, device=self.lengths.device)

    def add_bytes(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        if positions.shape[0] != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} sequences, got a batch of {positions.shape[0]}")
        last = int(positions.max())
        if last >= self.max_len:
            raise ValueError(f"cache is full: position {last} requested, capacity {self.max_len}")
        self.bytes.scatter_(1, torch.where(positions >= 0, positions, self.max_len), tokens)
        self.lengths.copy_(torch.maximum(self.lengths, positions.max(dim=1).values + 1))

    def truncate(self, lengths: torch.Tensor | list[int]) -> None:
        """Roll sequences back to `lengths` bytes: scale s keeps its positions j with js < length."""
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device)
        if bool((lengths > self.lengths).any()):
            raise ValueError("truncate can only shorten sequences")
        for s, scale in zip(self.scales_s, self.scales):
            scale.truncate((lengths + s - 1) // s)
        self.lengths.copy_(lengths)

    def reset(self, slots: int | list[int]) -> None:
        """Empty the given slots (sequence indices) for new sequences."""
        lengths = self.lengths.clone()
        lengths[slots] = 0
        self.truncate(lengths)

    def slots(self, start: int, stop: int) -> "MultiScaleCache":
        """A view of sequences start..stop-1 (shared memory): a forward on it reads and writes only them."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"slots {start}..{stop - 1} are not within the cache's {self.batch_size}")
        view = MultiScaleCache.__new__(MultiScaleCache)
        view.batch_size, view.max_len, view.scales_s = stop - start, self.max_len, self.scales_s
        view.lengths, view.bytes = self.lengths[start:stop], self.bytes[start:stop]
        view.scales = [scale.slots(start, stop) for scale in self.scales]
        view.outputs = [out[start:stop] for out in self.outputs]
        return view


def _stored(store: LayerKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A cache layer's entries (keys, values, positions) without adding any."""
    used = min(store.capacity, int(store.cache.lengths.max()))
    return store.stores[0][:, :, :used], store.stores[1][:, :, :used], store.pos[:, :used]


class MultiScaleTransformer(nn.Module):
    """The decoding contract of `slmforge.model.decoding`, as `Transformer` keeps it: forward(tokens,
    positions, cache, last_only, return_hidden), new_cache, logits; see the module docstring for the design."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ms, d = cfg.multiscale, cfg.d_model
        self.cfg, self.scales = cfg, list(ms.scales)
        n, L, C = len(self.scales), ms.layers_per_scale, ms.cross_layers
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.rope = RotaryEmbedding(cfg.rope_dim(), cfg.max_seq_len, cfg.rope_base, cfg.rope_layout, cfg.rope_scaling)
        self.downsample = nn.ModuleList(nn.Identity() if s == 1 else nn.Linear(s * d, d, bias=cfg.bias)
                                        for s in self.scales)
        self.stacks = nn.ModuleList(nn.ModuleList(Block(cfg, i, None) for i in range(L)) for _ in self.scales)
        self.pairs = [(a, b) for a in range(n) for b in range(n) if a != b]  # (query scale, key scale)
        self.cross = nn.ModuleList(nn.ModuleList(CrossScaleAttention(cfg) for _ in self.pairs) for _ in range(C))
        self.cross_after = [-(-(r + 1) * L // C) for r in range(C)]  # round r follows this many blocks
        self.fusion_gate = nn.Linear(n * d, n, bias=cfg.bias)
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList()  # no multi-token prediction (kept so `if not model.mtp` checks work)
        self.head_proj: nn.Module | None = None  # the head for decoding (slmforge.infer.kernels)
        self.reset_parameters()

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return head_logits(h, self.head_weight(), self.cfg.final_logit_softcap, self.head_proj)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The decoder's init: Normal(0, init_std), norm gains 1, biases 0, and the projections that write
        to a residual stream scaled by 1/sqrt(its number of writes: 2 per block, n - 1 per cross round)."""
        std, ms = self.cfg.init_std, self.cfg.multiscale
        writes = 2 * ms.layers_per_scale + ms.cross_layers * (len(self.scales) - 1)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std / writes ** 0.5)
            else:
                p.normal_(0.0, std)

    def new_cache(self, batch_size: int, max_len: int) -> MultiScaleCache:
        """An empty decoding cache for `batch_size` sequences of up to `max_len` bytes."""
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={self.cfg.max_seq_len}")
        ref = self.embed.weight
        return MultiScaleCache(self, batch_size, max_len, ref.dtype, ref.device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: MultiScaleCache | None = None, last_only: bool = False,
                return_hidden: bool = False) -> tuple[torch.Tensor, dict]:
        """tokens [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only), aux.

        positions [B, T] (-1 marks padding) continue each cached sequence; without a cache they must start
        at 0 in every row (left padding), and run as a one-off prefill. aux holds, when asked, "hidden"
        (the fused state before the final norm, [B, T, d]) and "scale_hidden" (each stack's output
        upsampled to the bytes, [B, T, d] per scale: what byte i reads from each scale).
        """
        B, T = tokens.shape
        if cache is None and positions is not None:
            cache = self.new_cache(B, T)
        if cache is None and T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        if cache is None:
            steps = self._whole_sequence(tokens)
            outputs = self._run_stacks(steps, None)
            ups = [h.repeat_interleave(s, dim=1)[:, :T] for h, s in zip(outputs, self.scales)]
        else:
            positions = cache.next_positions(T) if positions is None else positions
            steps = self._new_positions(tokens, positions, cache)
            ups = self._read_outputs(self._run_stacks(steps, cache), steps, positions, cache)
        if last_only and not return_hidden:
            ups = [u[:, -1:] for u in ups]
        gate = torch.softmax(self.fusion_gate(torch.cat(ups, dim=-1)), dim=-1)
        x = sum(gate[..., k, None] * u for k, u in enumerate(ups))
        aux = {"hidden": x, "scale_hidden": ups} if return_hidden else {}
        if last_only:
            x = x[:, -1:]
        return self.logits(self.norm(x)), aux

    def _whole_sequence(self, tokens: torch.Tensor) -> list[ScaleStep]:
        """Every position of every scale, for a sequence starting at byte 0."""
        (B, T), d = tokens.shape, self.cfg.d_model
        emb = self.embed(tokens)
        steps = []
        for k, s in enumerate(self.scales):
            n = -(-T // s)
            # shifted right by s - 1 (zeros), cut into n groups of s bytes: group j holds js - s + 1 .. js
            grouped = F.pad(emb, (0, 0, s - 1, 0))[:, :n * s].reshape(B, n, s * d)
            horizon = torch.arange(n, device=tokens.device) * s
            steps.append(ScaleStep(self.downsample[k](grouped), self.rope.full_tables(None, n),
                                   self.rope.full_tables(horizon, n), horizon))
        return steps

    def _new_positions(self, tokens: torch.Tensor, positions: torch.Tensor,
                       cache: MultiScaleCache) -> list[ScaleStep | None]:
        """The positions of each scale completed by the bytes at `positions` (None: a scale with none)."""
        cache.add_bytes(tokens, positions)
        B, T = tokens.shape
        column = torch.arange(T, device=tokens.device)
        steps = []
        for k, s in enumerate(self.scales):
            completes = (positions >= 0) & (positions % s == 0)  # byte js completes position j
            n = int(completes.sum(dim=1).max())
            if n == 0:
                steps.append(None)
                continue
            order = torch.where(completes, column, column + T).argsort(dim=1)[:, :n]  # those columns first
            horizon = torch.where(completes.gather(1, order), positions.gather(1, order), -1)
            pooled = horizon[..., None] + torch.arange(1 - s, 1, device=tokens.device)  # [B, n, s] bytes
            ids = cache.bytes.gather(1, pooled.clamp(min=0).flatten(1)).view(B, n, s)
            grouped = self.embed(ids) * (pooled >= 0)[..., None]  # zeros before byte 0, as when shifting
            coarse = torch.where(horizon >= 0, horizon // s, -1)
            cache.scales[k].begin(coarse)
            steps.append(ScaleStep(self.downsample[k](grouped.flatten(2)), self.rope.full_tables(coarse, n),
                                   self.rope.full_tables(horizon, n), horizon, coarse))
        return steps

    def _run_stacks(self, steps: list[ScaleStep | None], cache: MultiScaleCache | None) -> list[torch.Tensor | None]:
        """Each scale's blocks, with the cross-scale rounds between them; the stacks' final states."""
        h = [None if step is None else step.h for step in steps]
        self_masks = [{} for _ in steps]  # one memo per scale: their positions differ
        cross_masks: dict = {}
        for i in range(self.cfg.multiscale.layers_per_scale):
            for k, step in enumerate(steps):
                if step is not None:
                    kv = None if cache is None else cache.scales[k].layers[i]
                    h[k] = self.stacks[k][i](h[k], step.self_rope, kv, self_masks[k])
            for r, after in enumerate(self.cross_after):
                if after == i + 1:
                    h = self._cross_round(r, h, steps, cache, cross_masks)
        return h

    def _cross_round(self, r: int, h: list, steps: list, cache: MultiScaleCache | None, masks: dict) -> list:
        """Round r of cross-scale attention: every scale adds what it reads from each other scale."""
        n, first_store = len(self.scales), self.cfg.multiscale.layers_per_scale
        added = [None] * n
        for (a, b), layer in zip(self.pairs, self.cross[r]):
            if cache is None:
                k, v = layer.keys_values(h[b], steps[b].cross_rope)
            else:
                store = cache.scales[b].layers[first_store + r * (n - 1) + a - (a > b)]
                if steps[b] is not None:  # store b's new keys even when a has no query this step
                    k, v, key_coarse = store.update(*layer.keys_values(h[b], steps[b].cross_rope))
                elif steps[a] is not None:
                    k, v, key_coarse = _stored(store)
            if steps[a] is None:
                continue
            if (a, b) not in masks:
                if cache is None:  # horizons [n_a] and [n_b]
                    masks[a, b] = steps[b].horizon[None, :] <= steps[a].horizon[:, None]
                else:
                    masks[a, b] = self._cached_cross_mask(steps[a].horizon, key_coarse, self.scales[b], k.dtype)
            out = layer(h[a], steps[a].cross_rope, k, v, masks[a, b])
            added[a] = out if added[a] is None else added[a] + out
        return [x if extra is None else x + extra for x, extra in zip(h, added)]

    @staticmethod
    def _cached_cross_mask(query_horizon, key_coarse, key_scale: int, dtype) -> torch.Tensor:
        """Additive [B, 1, n_q, S] mask: a key is visible when its horizon is <= the query's. Finite, so
        the rows of padding queries average harmlessly instead of turning into NaN."""
        key_horizon = torch.where(key_coarse >= 0, key_coarse * key_scale, torch.iinfo(torch.long).max)
        allowed = key_horizon[:, None, :] <= query_horizon[:, :, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)

    def _read_outputs(self, outputs: list, steps: list, positions: torch.Tensor,
                      cache: MultiScaleCache) -> list[torch.Tensor]:
        """Store the new positions' outputs; return what each byte at `positions` reads from each scale:
        scale s's position floor(p / s), [B, T, d] per scale."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        ups = []
        for k, s in enumerate(self.scales):
            store, scratch = cache.outputs[k], cache.outputs[k].shape[1] - 1
            if steps[k] is not None:
                coarse = steps[k].coarse
                store[rows, torch.where(coarse >= 0, coarse, scratch)] = outputs[k].to(store.dtype)
            ups.append(store[rows, torch.where(positions >= 0, positions // s, scratch)])
        return ups

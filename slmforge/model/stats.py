"""Size and cost figures of a model config, computed without allocating its weights."""

import torch
from torch.overrides import TorchFunctionMode

from slmforge.config import ModelConfig
from slmforge.model import MultiScaleTransformer, build_model


class _SkipInit(TorchFunctionMode):
    """Weights built only to be counted need no values: their initialisers are skipped (on the meta device
    they would import torch's compiler stack, ~1.5 s, for nothing)."""

    INITIALISERS = {"normal_", "uniform_", "zero_", "fill_", "trunc_normal_", "copy_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.INITIALISERS:
            return args[0] if args else kwargs["tensor"]  # Tensor.normal_(t, ...) or nn.init.normal_(tensor=t)
        return func(*args, **kwargs)


def _kv_values_per_token(cfg: ModelConfig) -> tuple[int, int]:
    """Numbers one layer's cache keeps per token, and what the same attention would keep as plain
    per-head keys and values (equal for GQA; for MLA, its expanded multi-head form)."""
    if cfg.attention != "mla":
        n = 2 * cfg.n_kv_heads * cfg.head_dim
        return n, n
    m = cfg.mla
    latent = m.kv_lora_rank + m.rope_head_dim
    return latent, cfg.n_kv_heads * (m.qk_head_dim + m.rope_head_dim + m.v_head_dim)


def _numel(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _multiscale_costs(model: MultiScaleTransformer, context: int) -> tuple[int, int, int]:
    """(forward FLOPs per byte at `context`, KV values per byte, KV values over `context` bytes) of the
    multi-scale model. A position of scale s serves s bytes, so its weights count 1/s per byte: a
    cross-scale pair (a, b) counts its query side (norm, q, o) at 1/a and its key side (norm, k, v) at 1/b.
    Attention at the last byte of the context: scale s's self-attention spans context/s positions, and a
    pair (a, b) spans the context/b positions of b, per position of a."""
    cfg, scales = model.cfg, model.scales
    heads, head_dim, kv_heads = cfg.n_heads, cfg.head_dim, cfg.n_kv_heads
    matmul = cfg.vocab_size * cfg.d_model + _numel(model.fusion_gate, model.norm)
    attention = 0.0
    for k, s in enumerate(scales):
        matmul += _numel(model.stacks[k], model.downsample[k]) / s
        attention += cfg.multiscale.layers_per_scale * 2 * heads * 2 * head_dim * (context / s) / s
    for layers in model.cross:
        for (a, b), layer in zip(model.pairs, layers):
            attn = layer.attn
            matmul += _numel(layer.query_norm, attn.q_proj, attn.o_proj) / scales[a]
            matmul += _numel(layer.context_norm, attn.k_proj, attn.v_proj) / scales[b]
            attention += 2 * heads * 2 * head_dim * (context / scales[b]) / scales[a]
    # A position keeps keys and values for its stack's blocks and for the n - 1 pairs per round that read it.
    stores = cfg.multiscale.layers_per_scale + len(model.cross) * (len(scales) - 1)
    per_position = stores * 2 * kv_heads * head_dim
    kv_per_byte = sum(per_position / s for s in scales)
    kv_full = sum(per_position * -(-context // s) for s in scales)
    return round(2 * matmul + attention), round(kv_per_byte), kv_full


def model_stats(cfg: ModelConfig, context: int | None = None) -> dict:
    """Parameters, FLOPs per token and KV-cache bytes of `cfg` at `context` tokens (default: max_seq_len)."""
    context = context or cfg.max_seq_len
    with torch.device("meta"), _SkipInit():
        model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel()
    mtp = sum(p.numel() for p in model.mtp.parameters())
    # A token runs through top_k of a layer's routed experts; the others' weights sit idle for it.
    moe_layers = sum(cfg.layer_is_moe(i) for i in range(cfg.n_layers))
    per_expert = 3 * cfg.d_model * cfg.moe.expert_d_ff
    idle = moe_layers * (cfg.moe.n_experts - cfg.moe.top_k) * per_expert
    active = total - mtp - idle
    if isinstance(model, MultiScaleTransformer):
        forward_flops, kv_per_token, kv_full_context = _multiscale_costs(model, context)
        expanded_per_token = kv_per_token
    else:
        # Every active weight but the embedding lookup is used as a matmul per token; a tied head is one too.
        matmul_params = active - embedding + cfg.vocab_size * cfg.d_model
        spans = [context if w is None else min(w, context) for w in cfg.layer_windows()]
        if cfg.attention == "mla":
            qk_dim, v_dim = cfg.mla.qk_head_dim + cfg.mla.rope_head_dim, cfg.mla.v_head_dim
        else:
            qk_dim = v_dim = cfg.head_dim
        # QK^T and AV: 2 FLOPs per multiply-add, over each head's channels and the attended span.
        attention_flops = sum(2 * cfg.n_heads * (qk_dim + v_dim) * s for s in spans)
        forward_flops = 2 * matmul_params + attention_flops
        kv_per_layer, expanded_per_layer = _kv_values_per_token(cfg)
        kv_per_token, expanded_per_token = kv_per_layer * cfg.n_layers, expanded_per_layer * cfg.n_layers
        kv_full_context = sum(kv_per_layer * s for s in spans)
    return {
        "total_params": total,
        "embedding_params": embedding,
        "non_embedding_params": total - embedding,
        "mtp_params": mtp,
        "active_params_per_token": active,  # main model only: MTP modules serve training and drafting
        "context": context,
        "forward_flops_per_token": forward_flops,
        "train_flops_per_token": 3 * forward_flops,
        "kv_bytes_per_token_bf16": kv_per_token * 2,
        "kv_bytes_per_token_expanded_bf16": expanded_per_token * 2,
        "kv_cache_bytes_full_context_bf16": kv_full_context * 2,
        "weights_bytes_bf16": total * 2,
    }


def format_stats(name: str, stats: dict) -> str:
    def human(n: float, unit: str = "") -> str:
        for suffix in ("", "K", "M", "G", "T"):
            if abs(n) < 1000:
                return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
            n /= 1000
        return f"{n:.1f}P{unit}"

    mib = 1024 * 1024
    rows = [
        ("parameters", f"{stats['total_params']:,} ({human(stats['total_params'])})"),
        ("  embedding", f"{stats['embedding_params']:,}"),
        ("  non-embedding", f"{stats['non_embedding_params']:,}"),
        ("  of which MTP modules", f"{stats['mtp_params']:,}"),
        ("active per token", f"{stats['active_params_per_token']:,} ({human(stats['active_params_per_token'])})"),
        (f"FLOPs/token forward @{stats['context']}", human(stats["forward_flops_per_token"], "FLOP")),
        (f"FLOPs/token train   @{stats['context']}", human(stats["train_flops_per_token"], "FLOP")),
        ("KV cache per token (bf16)", f"{stats['kv_bytes_per_token_bf16']:,} bytes"
         + (f" (latent; {stats['kv_bytes_per_token_expanded_bf16']:,} as per-head keys and values)"
            if stats["kv_bytes_per_token_expanded_bf16"] != stats["kv_bytes_per_token_bf16"] else "")),
        (f"KV cache at {stats['context']} tokens (bf16)", f"{stats['kv_cache_bytes_full_context_bf16'] / mib:.1f} MiB"
         f" = {stats['kv_cache_bytes_full_context_bf16'] / stats['context']:,.0f} bytes/token (sliding rings hold W)"),
        ("weights in bf16", f"{stats['weights_bytes_bf16'] / mib:.1f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([name] + [f"  {k.ljust(width)}  {v}" for k, v in rows])

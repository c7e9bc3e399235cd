"""Size and cost figures of a model config, computed without allocating its weights."""

import torch

from slmforge.config import ModelConfig
from slmforge.model.transformer import Transformer


def model_stats(cfg: ModelConfig, context: int | None = None) -> dict:
    """Parameters, FLOPs per token and KV-cache bytes of `cfg` at `context` tokens (default: max_seq_len)."""
    context = context or cfg.max_seq_len
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel()
    # Every weight but the embedding lookup is used as a matmul per token; a tied head is a matmul too.
    matmul_params = total - embedding + cfg.vocab_size * cfg.d_model
    spans = [context if w is None else min(w, context) for w in cfg.layer_windows()]
    # QK^T and AV: 2 FLOPs per multiply-add, over n_heads*head_dim channels and the attended span.
    attention_flops = sum(2 * 2 * cfg.n_heads * cfg.head_dim * s for s in spans)
    forward_flops = 2 * matmul_params + attention_flops
    kv_per_token_layer = 2 * cfg.n_kv_heads * cfg.head_dim  # keys and values
    kv_bytes_full = sum(kv_per_token_layer * s for s in spans) * 2  # bf16 at `context` tokens
    return {
        "total_params": total,
        "embedding_params": embedding,
        "non_embedding_params": total - embedding,
        "active_params_per_token": total,  # dense: every weight is used for every token
        "context": context,
        "forward_flops_per_token": forward_flops,
        "train_flops_per_token": 3 * forward_flops,
        "kv_bytes_per_token_bf16": kv_per_token_layer * cfg.n_layers * 2,
        "kv_cache_bytes_full_context_bf16": kv_bytes_full,
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
        ("active per token", f"{stats['active_params_per_token']:,}"),
        (f"FLOPs/token forward @{stats['context']}", human(stats["forward_flops_per_token"], "FLOP")),
        (f"FLOPs/token train   @{stats['context']}", human(stats["train_flops_per_token"], "FLOP")),
        ("KV cache per token (bf16)", f"{stats['kv_bytes_per_token_bf16']:,} bytes"),
        (f"KV cache at {stats['context']} tokens (bf16)", f"{stats['kv_cache_bytes_full_context_bf16'] / mib:.1f} MiB"
         f" = {stats['kv_cache_bytes_full_context_bf16'] / stats['context']:,.0f} bytes/token (sliding rings hold W)"),
        ("weights in bf16", f"{stats['weights_bytes_bf16'] / mib:.1f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([name] + [f"  {k.ljust(width)}  {v}" for k, v in rows])

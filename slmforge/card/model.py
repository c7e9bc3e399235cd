"""The card's architecture section and the tags it is known by, from the checkpoint's config, its
tokenizer.json and `slmforge.model.stats` (the figures `slmforge info` prints)."""

from __future__ import annotations

from slmforge.card import fmt
from slmforge.config import ModelConfig


def attention_kind(m: ModelConfig) -> str:
    """'MLA', 'MHA', 'MQA' or 'GQA'."""
    if m.attention == "mla":
        return "MLA"
    kv = m.n_kv_heads or m.n_heads
    return "MHA" if kv == m.n_heads else "MQA" if kv == 1 else "GQA"


def tokenizer_kind(tokenizer: dict) -> tuple[str, bool]:
    """(a description of tokenizer.json, whether it is the plain byte tokenizer)."""
    model = tokenizer.get("model") or {}
    vocab, merges = len(model.get("vocab") or {}), len(model.get("merges") or [])
    added = [t.get("content") for t in tokenizer.get("added_tokens") or [] if isinstance(t, dict)]
    special = f"{len(added)} special token{'s' if len(added) != 1 else ''}"
    if model.get("type") == "BPE" and merges == 0 and vocab == 256:
        return f"bytes: 256 byte tokens + {special} (no merges)", True
    if model.get("type") == "BPE":
        return f"byte-level BPE: {vocab:,} tokens from {merges:,} merges + {special}", False
    return f"{model.get('type', 'unknown')} tokenizer of {vocab + len(added):,} tokens", False


def tags(m: ModelConfig, byte_level: bool, optimizers: list[str], native: bool, from_scratch: bool) -> list[str]:
    """Hugging Face tags: slmforge, then the kinds of parts the model is made of (and trained with)."""
    out = ["slmforge", "text-generation"] + (["from-scratch"] if from_scratch else [])
    if m.arch == "multiscale":
        out.append("multiscale-transformer")
    out.append(attention_kind(m).lower())
    if any(w is not None for w in m.layer_windows()):
        out.append("sliding-window-attention")
    out.append("mixture-of-experts" if m.ffn == "moe" else "dense")
    if m.mtp_depth:
        out.append("multi-token-prediction")
    if m.residual != "add":
        out.append("attention-residuals")
    if m.qk_norm:
        out.append("qk-norm")
    if m.final_logit_softcap is not None or m.attn_logit_softcap is not None:
        out.append("logit-softcap")
    if byte_level:
        out.append("byte-level")
    out += [o for o in dict.fromkeys(optimizers) if o not in out]
    if not native:
        out.append("custom_code")
    return out


def _attention(m: ModelConfig) -> str:
    kind = attention_kind(m)
    kv = m.n_kv_heads or m.n_heads
    if kind == "MLA":
        a = m.mla
        q = f"queries through a rank-{a.q_lora_rank} latent" if a.q_lora_rank else "queries projected directly"
        rope = (f"RoPE on {a.rope_head_dim} decoupled key channels" if a.rope_mode == "decoupled"
                else "RoPE on the whole query/key head")
        return (f"MLA (multi-head latent attention): {m.n_heads} heads, {kv} key/value head{'s' if kv > 1 else ''}, "
                f"key/value latent of rank {a.kv_lora_rank}, {q}; query/key head dim {a.qk_head_dim}, value head "
                f"dim {a.v_head_dim}; {rope}")
    names = {"MHA": "multi-head", "MQA": "multi-query", "GQA": "grouped-query"}
    return f"{kind} ({names[kind]}): {m.n_heads} query heads, {kv} key/value head{'s' if kv > 1 else ''}, " \
           f"head dim {m.head_dim}"


def _span(m: ModelConfig) -> str:
    windows = m.layer_windows()
    sliding = [w for w in windows if w is not None]
    if not sliding:
        return f"global in all {len(windows)} layers"
    return (f"sliding window of {m.sliding_window} tokens in {len(sliding)} of {len(windows)} layers, global in "
            f"{len(windows) - len(sliding)} (pattern {', '.join(m.attention_pattern)}"
            f"{', last layer global' if m.last_layer_global else ''})")


def _ffn(m: ModelConfig) -> str:
    if m.ffn != "moe":
        return f"SwiGLU, width {m.d_ff}"
    e = m.moe
    parts = [f"mixture of experts: {e.n_experts} routed SwiGLU experts of width {e.expert_d_ff}, top-{e.top_k} "
             f"by {e.score} scores{' (renormalised)' if e.norm_topk else ''}"]
    if e.shared_d_ff:
        parts.append(f"a shared expert of width {e.shared_d_ff}{' with a sigmoid gate' if e.shared_gate else ''}")
    if e.first_dense_layers:
        first = "the first layer" if e.first_dense_layers == 1 else f"the first {e.first_dense_layers} layers"
        parts.append(f"{first} dense (SwiGLU, width {m.d_ff})")
    balance = []
    if e.bias_update_rate:
        balance.append(f"auxiliary-loss-free bias (rate {e.bias_update_rate:g})")
    if e.balance_loss:
        balance.append(f"balance loss (coefficient {e.balance_loss:g})")
    if balance:
        parts.append("load balancing by " + " and ".join(balance))
    return "; ".join(parts)


def _residual(m: ModelConfig) -> str:
    return {
        "add": "additive (h + f(h)), pre-norm",
        "attnres_full": "attention residuals (Kimi), over every sublayer output",
        "attnres_block": f"attention residuals (Kimi), over {m.residual_blocks} block sums",
        "attnres_codemind": f"attention residuals, CodeMind's variant ({m.residual_blocks} blocks)",
    }.get(m.residual, m.residual)


def _position(m: ModelConfig) -> str:
    layout = "rotate-half layout" if m.rope_layout == "half" else "adjacent-pairs layout"
    base = f"{m.rope_base:,.0f}" if float(m.rope_base).is_integer() else f"{m.rope_base:g}"
    text = f"RoPE, base {base} ({layout})"
    s = m.rope_scaling
    if s.kind != "none":
        text += f"; {s.kind} scaling x{s.factor:g}"
        text += f" from {s.original_max_len} tokens" if s.original_max_len else ""
    return text


def _kv(stats: dict) -> str:
    per_token = stats["kv_bytes_per_token_bf16"]
    text = f"{per_token:,} bytes per token in bf16"
    if stats["kv_bytes_per_token_expanded_bf16"] != per_token:
        text += f" (the latent; {stats['kv_bytes_per_token_expanded_bf16']:,} as per-head keys and values)"
    return text + f"; {fmt.mib(stats['kv_cache_bytes_full_context_bf16'])} at {stats['context']:,} tokens"


def architecture_rows(m: ModelConfig, stats: dict, tokenizer: str, byte_level: bool, seq_len: int | None,
                      weights_file_bytes: int) -> list[tuple[str, str]]:
    total, active = stats["total_params"], stats["active_params_per_token"]
    if active == total:
        active_text = "all of them" + (" (dense)" if m.ffn != "moe" else "")
    else:
        why = [f"top-{m.moe.top_k} of {m.moe.n_experts} experts"] if m.ffn == "moe" else []
        why += ["MTP modules excluded"] if stats["mtp_params"] else []
        active_text = f"{fmt.count_human(active)} ({', '.join(why)})"
    rows = [
        ("Parameters", fmt.count_human(total)),
        ("Active parameters per token", active_text),
        ("Embedding / non-embedding", f"{stats['embedding_params']:,} / {stats['non_embedding_params']:,}"
         + (" (input and output embedding tied)" if m.tie_embeddings else " (separate output head)")),
    ]
    if m.arch == "multiscale":
        s = m.multiscale
        rows.append(("Layers", f"multi-scale byte transformer: {len(s.scales)} stacks at scales "
                     f"{', '.join(f'{x}x' for x in s.scales)}, {s.layers_per_scale} layers each, {s.cross_layers} "
                     "rounds of cross-scale attention"))
    else:
        rows.append(("Layers", str(m.n_layers)))
    rows += [
        ("Hidden size (d_model)", str(m.d_model)),
        ("Attention", _attention(m)),
    ]
    if m.arch != "multiscale":
        rows.append(("Attention span", _span(m)))
    rows += [
        ("Feed-forward", _ffn(m)),
        ("Multi-token prediction", f"{m.mtp_depth} module{'s' if m.mtp_depth > 1 else ''} "
                                   f"({stats['mtp_params']:,} parameters)" if m.mtp_depth else "none"),
        ("Residual", _residual(m)),
        ("Normalisation", f"RMSNorm (eps {m.norm_eps:g})" + (", QK-norm" if m.qk_norm else "")),
        ("Position", _position(m)),
    ]
    caps = [f"final logits {m.final_logit_softcap:g}" if m.final_logit_softcap is not None else "",
            f"attention logits {m.attn_logit_softcap:g}" if m.attn_logit_softcap is not None else ""]
    rows.append(("Logit soft-cap", ", ".join(c for c in caps if c) or "none"))
    context = f"{m.max_seq_len:,} tokens" + (" (bytes)" if byte_level else "")
    if seq_len is not None and seq_len != m.max_seq_len:
        context += f" (trained on windows of {seq_len:,})"
    rows += [
        ("Context length", context),
        ("Vocabulary", f"{m.vocab_size:,} embedding rows; tokenizer: {tokenizer}"),
        ("KV cache", _kv(stats)),
        ("Forward FLOPs per token", f"{fmt.human(stats['forward_flops_per_token'])}FLOP at {stats['context']:,} "
                                    "tokens of context"),
        ("Weights", f"{fmt.mib(stats['weights_bytes_bf16'])} in bf16; model.safetensors holds "
                    f"{fmt.mib(weights_file_bytes)}"),
    ]
    return rows

"""Validation: impossible shapes and unknown choices raise a ConfigError naming the key, before any
tensor exists; derived defaults (n_kv_heads, head_dim) are resolved into explicit values."""

from __future__ import annotations

from slmforge.config.tree import (
    ConfigError,
    ModelConfig,
    MoEConfig,
    PhaseConfig,
    RunConfig,
)


def _positive(value, key: str):
    if value is None or value <= 0:
        raise ConfigError(f"{key} must be positive, got {value}")


def _choice(value, choices, key: str):
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def validate_model(m: ModelConfig) -> None:
    """Check shapes and resolve derived defaults (n_kv_heads, head_dim) into explicit values."""
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
        _positive(getattr(m, key), f"model.{key}")
    if m.head_dim is None:
        if m.d_model % m.n_heads:
            raise ConfigError(f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}")
        m.head_dim = m.d_model // m.n_heads
    _positive(m.head_dim, "model.head_dim")
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim={m.head_dim} must be even for RoPE")
    if m.n_kv_heads is None:
        m.n_kv_heads = m.n_heads
    _positive(m.n_kv_heads, "model.n_kv_heads")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}")
    _choice(m.rope_layout, ("half", "pairs"), "model.rope_layout")
    if not m.attention_pattern:
        raise ConfigError("model.attention_pattern must list at least one of 'global', 'sliding'")
    for i, kind in enumerate(m.attention_pattern):
        _choice(kind, ("global", "sliding"), f"model.attention_pattern.{i}")
    if "sliding" in m.attention_pattern:
        _positive(m.sliding_window, "model.sliding_window")
        if m.sliding_window > m.max_seq_len:
            raise ConfigError(
                f"model.sliding_window={m.sliding_window} is larger than model.max_seq_len={m.max_seq_len}"
            )
    for key in ("final_logit_softcap", "attn_logit_softcap"):
        value = getattr(m, key)
        if value is not None and value <= 0:
            raise ConfigError(f"model.{key} must be positive or null, got {value}")
    _positive(m.norm_eps, "model.norm_eps")
    _positive(m.rope_base, "model.rope_base")
    _choice(m.attention, ("gqa", "mla"), "model.attention")
    if m.attention == "mla":
        _validate_mla(m)
    _choice(m.ffn, ("dense", "moe"), "model.ffn")
    if m.ffn == "moe":
        _validate_moe(m.moe, m.n_layers)
    _choice(m.residual, ("add", "attnres_full", "attnres_block", "attnres_codemind"), "model.residual")
    if m.residual in ("attnres_block", "attnres_codemind"):
        _positive(m.residual_blocks, "model.residual_blocks")
        if m.residual_blocks > m.n_layers:
            raise ConfigError(f"model.residual_blocks={m.residual_blocks} exceeds model.n_layers={m.n_layers}")
        if m.residual == "attnres_codemind" and m.n_layers % m.residual_blocks:
            raise ConfigError(f"model.residual_blocks={m.residual_blocks} must divide model.n_layers={m.n_layers} "
                              "with model.residual=attnres_codemind (CodeMind's blocks are equal)")
    if m.mtp_depth < 0:
        raise ConfigError(f"model.mtp_depth must be >= 0, got {m.mtp_depth}")
    _choice(m.arch, ("decoder", "multiscale"), "model.arch")
    if m.arch == "multiscale":
        _validate_multiscale(m)


def _validate_multiscale(m: ModelConfig) -> None:
    s = m.multiscale
    if not s.scales or s.scales[0] != 1 or any(b <= a for a, b in zip(s.scales, s.scales[1:])):
        raise ConfigError(f"model.multiscale.scales must start at 1 and increase, got {s.scales}")
    for i, factor in enumerate(s.scales):
        if m.max_seq_len % factor:
            raise ConfigError(f"model.multiscale.scales.{i}={factor} does not divide model.max_seq_len={m.max_seq_len}")
    _positive(s.layers_per_scale, "model.multiscale.layers_per_scale")
    if s.cross_layers < 0:
        raise ConfigError(f"model.multiscale.cross_layers must be >= 0, got {s.cross_layers}")
    for key, value in (("attention", "gqa"), ("ffn", "dense"), ("residual", "add"), ("mtp_depth", 0)):
        if getattr(m, key) != value:
            raise ConfigError(f"model.{key}={getattr(m, key)!r} is not supported with model.arch=multiscale "
                              f"(use {value!r})")


def _validate_mla(m: ModelConfig) -> None:
    a = m.mla
    _choice(a.rope_mode, ("decoupled", "whole_head"), "model.mla.rope_mode")
    for key in ("kv_lora_rank", "qk_head_dim", "v_head_dim"):
        _positive(getattr(a, key), f"model.mla.{key}")
    if a.q_lora_rank < 0:
        raise ConfigError(f"model.mla.q_lora_rank must be >= 0 (0: no query latent), got {a.q_lora_rank}")
    if a.rope_mode == "decoupled":
        _positive(a.rope_head_dim, "model.mla.rope_head_dim")
    elif a.rope_head_dim != 0:
        raise ConfigError("model.mla.rope_head_dim must be 0 with model.mla.rope_mode=whole_head "
                          f"(RoPE turns the whole qk head), got {a.rope_head_dim}")
    if m.rope_dim() % 2:
        raise ConfigError(f"model.mla: RoPE needs an even number of channels, got {m.rope_dim()}")
    if m.attn_logit_softcap is not None:
        raise ConfigError("model.attn_logit_softcap is not supported with model.attention=mla")


def _validate_moe(e: MoEConfig, n_layers: int) -> None:
    for key in ("n_experts", "top_k", "expert_d_ff", "route_scale"):
        _positive(getattr(e, key), f"model.moe.{key}")
    if e.top_k > e.n_experts:
        raise ConfigError(f"model.moe.top_k={e.top_k} exceeds model.moe.n_experts={e.n_experts}")
    _choice(e.score, ("softmax", "sigmoid"), "model.moe.score")
    if e.shared_gate and e.shared_d_ff == 0:
        raise ConfigError("model.moe.shared_gate needs a shared expert (model.moe.shared_d_ff > 0)")
    for key in ("shared_d_ff", "first_dense_layers", "bias_update_rate", "balance_loss"):
        if getattr(e, key) < 0:
            raise ConfigError(f"model.moe.{key} must be >= 0, got {getattr(e, key)}")
    if e.first_dense_layers > n_layers:
        raise ConfigError(f"model.moe.first_dense_layers={e.first_dense_layers} exceeds model.n_layers={n_layers}")


def _validate_phase(p: PhaseConfig, prefix: str, model: ModelConfig) -> None:
    _positive(p.steps, f"{prefix}steps" if prefix else "train.steps")
    _positive(p.data.seq_len, f"{prefix}data.seq_len")
    _positive(p.data.batch_size, f"{prefix}data.batch_size")
    if p.data.seq_len > model.max_seq_len:
        raise ConfigError(
            f"{prefix}data.seq_len={p.data.seq_len} is larger than model.max_seq_len={model.max_seq_len}"
        )
    for name, w in p.data.weights.items():
        if w < 0:
            raise ConfigError(f"{prefix}data.weights.{name} must be >= 0, got {w}")
    _choice(p.optim.name, ("muon", "adamw", "lion", "sgd"), f"{prefix}optim.name")
    _choice(p.optim.others, ("adamw", "lion", "sgd"), f"{prefix}optim.others")
    if len(p.optim.lion_betas) != 2:
        raise ConfigError(f"{prefix}optim.lion_betas must hold two numbers")
    if not 0.0 <= p.optim.sgd_momentum < 1.0:
        raise ConfigError(f"{prefix}optim.sgd_momentum must lie in [0, 1), got {p.optim.sgd_momentum}")
    _choice(p.optim.muon_adjust_lr, ("original", "match_rms_adamw"), f"{prefix}optim.muon_adjust_lr")
    if len(p.optim.betas) != 2:
        raise ConfigError(f"{prefix}optim.betas must hold two numbers")
    _positive(p.optim.lr, f"{prefix}optim.lr")
    _positive(p.optim.muon_lr, f"{prefix}optim.muon_lr")
    _choice(p.schedule.name, ("wsd", "cosine", "constant"), f"{prefix}schedule.name")
    _choice(p.schedule.decay_shape, ("linear", "sqrt"), f"{prefix}schedule.decay_shape")
    if not 0.0 <= p.schedule.decay_fraction <= 1.0:
        raise ConfigError(f"{prefix}schedule.decay_fraction must lie in [0, 1], got {p.schedule.decay_fraction}")
    if p.schedule.warmup_steps < 0:
        raise ConfigError(f"{prefix}schedule.warmup_steps must be >= 0")


def validate(cfg: RunConfig) -> None:
    validate_model(cfg.model)
    t = cfg.train
    _choice(t.dtype, ("auto", "bf16", "fp32"), "train.dtype")
    for key in ("grad_accum", "log_every", "eval_every", "eval_batches", "save_every", "keep_last", "max_bad_steps"):
        _positive(getattr(t, key), f"train.{key}")
    for key in ("z_loss", "mtp_weight"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {getattr(t, key)}")
    names = set()
    for i, phase in enumerate(cfg.run_phases()):
        _validate_phase(phase, f"phases.{i}." if cfg.phases else "", cfg.model)
        if phase.name in names:
            raise ConfigError(f"phases.{i}.name: '{phase.name}' is used twice")
        names.add(phase.name)


def check_vocab(model: ModelConfig, tokenizer_vocab_size: int, source: str = "the tokenizer") -> None:
    """The embedding must have a row for every token id the tokenizer can emit."""
    if model.vocab_size < tokenizer_vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than {source}'s {tokenizer_vocab_size} tokens"
        )

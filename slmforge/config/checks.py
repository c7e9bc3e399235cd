"""Validation: every field's type was checked while building the tree (loading.py); here every value's
finiteness and range, then the shapes and combinations, each raising a ConfigError that names the key,
before any tensor exists. Derived defaults (n_kv_heads, head_dim) are resolved into explicit values."""

from __future__ import annotations

import dataclasses
import math

from slmforge.config.tree import (
    ConfigError,
    DataConfig,
    DistillConfig,
    LoraConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    MultiScaleConfig,
    OptimConfig,
    RopeScalingConfig,
    PhaseConfig,
    PreferenceConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
)

POSITIVE, NON_NEGATIVE, AT_LEAST_1 = "(0, inf)", "[0, inf)", "[1, inf)"
FRACTION = "[0, 1]"
MOMENTUM = "[0, 1)"  # a momentum of 1 never forgets, so the update never settles

# The values each field may take: an interval (for a list or mapping: of each item), a tuple of choices,
# or None: any value of the field's type. Floats must also be finite; null passes where the type allows it.
# Bools need no rule. Combinations of fields are checked by the functions below.
RULES: dict[type, dict[str, str | tuple | None]] = {
    ModelConfig: {
        "vocab_size": POSITIVE, "d_model": POSITIVE, "n_layers": POSITIVE, "n_heads": POSITIVE,
        "n_kv_heads": POSITIVE, "head_dim": POSITIVE, "d_ff": POSITIVE, "max_seq_len": POSITIVE,
        "norm_eps": POSITIVE, "rope_base": POSITIVE, "rope_layout": ("half", "pairs"),
        "attention_pattern": ("global", "sliding"), "sliding_window": POSITIVE,
        "final_logit_softcap": POSITIVE, "attn_logit_softcap": POSITIVE, "init_std": POSITIVE,
        "attention": ("gqa", "mla"), "ffn": ("dense", "moe"),
        "residual": ("add", "attnres_full", "attnres_block", "attnres_codemind"), "residual_blocks": POSITIVE,
        "mtp_depth": NON_NEGATIVE, "arch": ("decoder", "multiscale"),
    },
    MLAConfig: {
        "q_lora_rank": NON_NEGATIVE,  # 0: no query latent
        "kv_lora_rank": POSITIVE, "qk_head_dim": POSITIVE,
        "rope_head_dim": NON_NEGATIVE,  # positive with decoupled, 0 with whole_head (_validate_mla)
        "v_head_dim": POSITIVE, "rope_mode": ("decoupled", "whole_head"),
    },
    MoEConfig: {
        "n_experts": POSITIVE, "top_k": POSITIVE, "expert_d_ff": POSITIVE, "shared_d_ff": NON_NEGATIVE,
        "score": ("softmax", "sigmoid"), "route_scale": POSITIVE, "first_dense_layers": NON_NEGATIVE,
        "bias_update_rate": NON_NEGATIVE, "balance_loss": NON_NEGATIVE,
    },
    RopeScalingConfig: {
        "kind": ("none", "linear", "ntk", "yarn"), "factor": POSITIVE,
        "original_max_len": NON_NEGATIVE,  # positive with yarn (_validate_rope_scaling)
        "beta_fast": POSITIVE, "beta_slow": POSITIVE, "attention_factor": POSITIVE,
    },
    MultiScaleConfig: {"scales": POSITIVE, "layers_per_scale": POSITIVE, "cross_layers": NON_NEGATIVE},
    DataConfig: {
        "path": None,  # the trainer names a missing folder
        # 0 drops a source; an all-zero mixture is refused by the loader, which knows the folder's other sources
        "weights": NON_NEGATIVE,
        "seq_len": POSITIVE, "batch_size": POSITIVE, "packing": ("auto", "pack", "pad"),
    },
    OptimConfig: {
        "name": ("muon", "adamw", "lion", "sgd"), "others": ("adamw", "lion", "sgd"), "lr": POSITIVE,
        "betas": MOMENTUM, "eps": POSITIVE, "weight_decay": NON_NEGATIVE, "muon_lr": POSITIVE,
        "muon_momentum": MOMENTUM, "muon_ns_steps": AT_LEAST_1, "muon_weight_decay": NON_NEGATIVE,
        "muon_adjust_lr": ("original", "match_rms_adamw"),
        "lion_betas": MOMENTUM,  # as slmforge.optim.Lion requires
        "sgd_momentum": MOMENTUM, "grad_clip": NON_NEGATIVE,  # grad_clip 0: off
    },
    ScheduleConfig: {
        "name": ("wsd", "cosine", "constant"), "warmup_steps": NON_NEGATIVE, "decay_fraction": FRACTION,
        "decay_shape": ("linear", "sqrt"), "min_lr_ratio": FRACTION,
    },
    TrainConfig: {
        "steps": POSITIVE, "grad_accum": POSITIVE,
        "seed": "[0, 4294967296)",  # torch and numpy both take it (and seed + phase index)
        "dtype": ("auto", "bf16", "fp32"), "z_loss": NON_NEGATIVE, "mtp_weight": NON_NEGATIVE,
        "log_every": POSITIVE, "eval_every": POSITIVE, "eval_batches": POSITIVE, "save_every": POSITIVE,
        "keep_last": POSITIVE, "max_bad_steps": POSITIVE, "rank_check_every": NON_NEGATIVE,
        "rank_warn_ratio": "(0, 1]",  # sigma_min / sigma_max never exceeds 1
        "threads": NON_NEGATIVE,
        "init": None,  # a path, checked by the trainer when it opens it
    },
    PhaseConfig: {"name": None, "steps": POSITIVE},  # the name is a folder of the run (_validate_phase)
    LoraConfig: {"rank": NON_NEGATIVE, "alpha": POSITIVE, "targets": None},  # targets: matched when applied
    DistillConfig: {"teacher": None, "temperature": POSITIVE, "weight": FRACTION},
    PreferenceConfig: {"beta": POSITIVE, "reference": None},  # paths, checked when the run opens them
}


def _in_interval(value, interval: str, key: str) -> None:
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = lo < value if interval[0] == "(" else lo <= value
    below = value < hi if interval[-1] == ")" else value <= hi
    if above and below:
        return
    if interval == POSITIVE:
        raise ConfigError(f"{key} must be positive, got {value}")
    if hi == math.inf:
        raise ConfigError(f"{key} must be >= {lo:g}, got {value}")
    raise ConfigError(f"{key} must lie in {interval}, got {value}")


def _choice(value, choices, key: str):
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_values(value, key: str, rule=None) -> None:
    """Check a value (a dataclass by RULES, a list or mapping item by item) for finiteness and `rule`."""
    if dataclasses.is_dataclass(value):
        rules = RULES[type(value)]
        for f in dataclasses.fields(value):
            _check_values(getattr(value, f.name), f"{key}.{f.name}" if key else f.name, rules.get(f.name))
    elif isinstance(value, (list, dict)):
        for sub, item in value.items() if isinstance(value, dict) else enumerate(value):
            _check_values(item, f"{key}.{sub}", rule)
    elif isinstance(value, float) and not math.isfinite(value):  # NaN fails no comparison, so test it first
        raise ConfigError(f"{key} must be a finite number, got {value}")
    elif value is None or rule is None:  # null where the type allows it; bools need no rule
        return
    elif isinstance(rule, tuple):
        _choice(value, rule, key)
    else:
        _in_interval(value, rule, key)


def validate_model(m: ModelConfig) -> None:
    """Check values and shapes and resolve derived defaults (n_kv_heads, head_dim) into explicit values."""
    _check_values(m, "model")
    if m.head_dim is None:
        if m.d_model % m.n_heads:
            raise ConfigError(f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}")
        m.head_dim = m.d_model // m.n_heads
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim={m.head_dim} must be even for RoPE")
    if m.n_kv_heads is None:
        m.n_kv_heads = m.n_heads
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}")
    if not m.attention_pattern:
        raise ConfigError("model.attention_pattern must list at least one of 'global', 'sliding'")
    if "sliding" in m.attention_pattern and m.sliding_window > m.max_seq_len:
        raise ConfigError(f"model.sliding_window={m.sliding_window} is larger than model.max_seq_len={m.max_seq_len}")
    if m.rope_scaling.kind == "yarn" and m.rope_scaling.original_max_len <= 0:
        raise ConfigError("model.rope_scaling.original_max_len must be positive with model.rope_scaling.kind=yarn "
                          f"(the pretraining context), got {m.rope_scaling.original_max_len}")
    if m.attention == "mla":
        _validate_mla(m)
    if m.ffn == "moe":
        _validate_moe(m.moe, m.n_layers)
    if m.residual in ("attnres_block", "attnres_codemind"):
        if m.residual_blocks > m.n_layers:
            raise ConfigError(f"model.residual_blocks={m.residual_blocks} exceeds model.n_layers={m.n_layers}")
        if m.residual == "attnres_codemind" and m.n_layers % m.residual_blocks:
            raise ConfigError(f"model.residual_blocks={m.residual_blocks} must divide model.n_layers={m.n_layers} "
                              "with model.residual=attnres_codemind (CodeMind's blocks are equal)")
    if m.arch == "multiscale":
        _validate_multiscale(m)


def _validate_multiscale(m: ModelConfig) -> None:
    s = m.multiscale
    if not s.scales or s.scales[0] != 1 or any(b <= a for a, b in zip(s.scales, s.scales[1:])):
        raise ConfigError(f"model.multiscale.scales must start at 1 and increase, got {s.scales}")
    for i, factor in enumerate(s.scales):
        if m.max_seq_len % factor:
            raise ConfigError(f"model.multiscale.scales.{i}={factor} does not divide model.max_seq_len={m.max_seq_len}")
    for key, value in (("attention", "gqa"), ("ffn", "dense"), ("residual", "add"), ("mtp_depth", 0)):
        if getattr(m, key) != value:
            raise ConfigError(f"model.{key}={getattr(m, key)!r} is not supported with model.arch=multiscale "
                              f"(use {value!r})")


def _validate_mla(m: ModelConfig) -> None:
    a = m.mla
    if a.rope_mode == "decoupled" and a.rope_head_dim == 0:
        raise ConfigError("model.mla.rope_head_dim must be positive with model.mla.rope_mode=decoupled, got 0")
    if a.rope_mode == "whole_head" and a.rope_head_dim != 0:
        raise ConfigError("model.mla.rope_head_dim must be 0 with model.mla.rope_mode=whole_head "
                          f"(RoPE turns the whole qk head), got {a.rope_head_dim}")
    if m.rope_dim() % 2:
        raise ConfigError(f"model.mla: RoPE needs an even number of channels, got {m.rope_dim()}")
    if m.attn_logit_softcap is not None:
        raise ConfigError("model.attn_logit_softcap is not supported with model.attention=mla")


def _validate_moe(e: MoEConfig, n_layers: int) -> None:
    if e.top_k > e.n_experts:
        raise ConfigError(f"model.moe.top_k={e.top_k} exceeds model.moe.n_experts={e.n_experts}")
    if e.shared_gate and e.shared_d_ff == 0:
        raise ConfigError("model.moe.shared_gate needs a shared expert (model.moe.shared_d_ff > 0)")
    if e.first_dense_layers > n_layers:
        raise ConfigError(f"model.moe.first_dense_layers={e.first_dense_layers} exceeds model.n_layers={n_layers}")


def _validate_phase(p: PhaseConfig, prefix: str, model: ModelConfig) -> None:
    if p.data.seq_len > model.max_seq_len:
        raise ConfigError(
            f"{prefix}data.seq_len={p.data.seq_len} is larger than model.max_seq_len={model.max_seq_len}"
        )
    for key in ("betas", "lion_betas"):
        if len(getattr(p.optim, key)) != 2:
            raise ConfigError(f"{prefix}optim.{key} must hold two numbers")


def validate(cfg: RunConfig) -> None:
    validate_model(cfg.model)
    # the top-level sections first, so a value the phases inherit is named where it was set
    for key in ("data", "optim", "schedule", "train", "phases", "lora", "distill", "preference"):
        _check_values(getattr(cfg, key), key)
    names = set()
    for i, phase in enumerate(cfg.run_phases()):
        _validate_phase(phase, f"phases.{i}." if cfg.phases else "", cfg.model)
        if cfg.phases and (phase.name in ("", ".", "..") or "/" in phase.name or "\\" in phase.name):
            raise ConfigError(f"phases.{i}.name must be a folder name (its checkpoints go there), got {phase.name!r}")
        if phase.name in names:
            raise ConfigError(f"phases.{i}.name: '{phase.name}' is used twice")
        names.add(phase.name)


def check_vocab(model: ModelConfig, tokenizer_vocab_size: int, source: str = "the tokenizer") -> None:
    """The embedding must have a row for every token id the tokenizer can emit."""
    if model.vocab_size < tokenizer_vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than {source}'s {tokenizer_vocab_size} tokens"
        )

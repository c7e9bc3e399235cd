"""One dataclass tree for a run: model, data, optimizer, schedule, training and phases.

A config is built from a YAML preset shipped in `slmforge/presets/` or a YAML/JSON file, then
`--set a.b=value` overrides are applied to the raw mapping before validation, so every error names the
key it came from and is raised before any tensor exists. The resolved tree is what `config.json` in a
checkpoint holds: every choice that changes the math is an explicit field.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

FORMAT_VERSION = 1
PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration problem, always naming the offending key."""


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 512
    n_layers: int = 12
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: same as n_heads (MHA); 1: MQA
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 2048
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    rope_layout: str = "half"  # "half": rotate-half (Llama/HF, NEOX); "pairs": adjacent pairs (GPT-J)
    qk_norm: bool = False
    tie_embeddings: bool = True
    bias: bool = False
    # Attention kind per layer, cycled over the layers: "global" or "sliding" (window `sliding_window`).
    attention_pattern: list[str] = field(default_factory=lambda: ["global"])
    sliding_window: int = 1024
    last_layer_global: bool = True
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    init_std: float = 0.02

    def layer_windows(self) -> list[int | None]:
        """Attention window of each layer: None for global attention."""
        kinds = [self.attention_pattern[i % len(self.attention_pattern)] for i in range(self.n_layers)]
        if self.last_layer_global:
            kinds[-1] = "global"
        return [self.sliding_window if k == "sliding" else None for k in kinds]


@dataclass
class DataConfig:
    path: str | None = None  # a folder written by `slmforge data prepare`
    weights: dict[str, float] = field(default_factory=dict)  # mixture override; empty: the folder's own
    seq_len: int = 512
    batch_size: int = 8  # sequences per micro-batch per process


@dataclass
class OptimConfig:
    name: str = "muon"  # "muon": Muon on hidden 2-D weights + AdamW on the rest; "adamw": AdamW only
    lr: float = 3e-3  # AdamW learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_weight_decay: float = 0.0
    muon_adjust_lr: str = "original"  # "original": sqrt(max(1, rows/cols)); "match_rms_adamw": 0.2*sqrt(max(rows, cols))
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class ScheduleConfig:
    name: str = "wsd"  # "wsd" | "cosine" | "constant"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying
    decay_shape: str = "linear"  # wsd: "linear" or "sqrt" (1 - sqrt)
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 1000
    grad_accum: int = 1
    seed: int = 1337
    dtype: str = "auto"  # "auto": bf16 autocast where the hardware has fast bf16, else fp32; "bf16"; "fp32"
    compile: bool = False
    z_loss: float = 1e-4
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 500
    keep_last: int = 3
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    rank_check_every: int = 0  # 0: off; else estimate Muon matrices' smallest singular value every N steps
    rank_warn_ratio: float = 1e-3  # warn when sigma_min / sigma_max falls below this


@dataclass
class PhaseConfig:
    """One phase of a run (e.g. pretrain, then anneal). Unset parts are inherited from the top level."""

    name: str = "main"
    steps: int = 1000
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def run_phases(self) -> list[PhaseConfig]:
        """The phases to run; a run without phases is one phase named 'main'."""
        if self.phases:
            return self.phases
        return [PhaseConfig("main", self.train.steps, self.data, self.optim, self.schedule)]


# ----------------------------------------------------------------------------------------------
# building from mappings


def _check_type(value, hint, key: str):
    """Coerce a YAML value to the dataclass field type, or raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], key)
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # PyYAML reads "1e-4" (no dot) and "1.0e6" (no sign) as strings
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _check_type(v, args[1], f"{key}.{k}") for k, v in value.items()}
    return value


def _build(cls, raw, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            kwargs[key] = _build(hint_type, value, full)
        else:
            kwargs[key] = _check_type(value, hint_type, full)
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def from_dict(raw: dict) -> RunConfig:
    """Build and validate a RunConfig; phases inherit data/optim/schedule from the top level."""
    raw = copy.deepcopy(raw)
    version = raw.pop("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ConfigError(f"format_version: this slmforge reads version {FORMAT_VERSION}, got {version}")
    raw_phases = raw.pop("phases", None) or []
    if not isinstance(raw_phases, list):
        raise ConfigError("phases: expected a list of phases")
    cfg = _build(RunConfig, raw, "")
    phases = []
    for i, phase in enumerate(raw_phases):
        if not isinstance(phase, dict):
            raise ConfigError(f"phases.{i}: expected a mapping")
        merged = {"name": f"phase{i}", "steps": cfg.train.steps}
        for part in ("data", "optim", "schedule"):
            merged[part] = _deep_merge(raw.get(part) or {}, phase.get(part) or {})
        merged.update({k: v for k, v in phase.items() if k not in ("data", "optim", "schedule")})
        phases.append(_build(PhaseConfig, merged, f"phases.{i}"))
    cfg.phases = phases
    validate(cfg)
    return cfg


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. model.n_layers=4")
    key, value = item.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (list items by index: `phases.1.steps=50`)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, value = _parse_override(item)
        node = raw
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override '{item}': no item {part} in '{'.'.join(path[:i])}'")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override '{item}': no item {last} in '{'.'.join(path[:-1])}'")
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_mapping(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML/JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def load_raw(preset_or_path: str) -> dict:
    """The raw mapping of a preset name or a YAML/JSON file, with `base:` presets merged in."""
    path = Path(preset_or_path)
    if not path.is_file():
        path = PRESET_DIR / f"{preset_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset or file '{preset_or_path}' (presets: {', '.join(list_presets())})")
    raw = _read_mapping(path)
    base = raw.pop("base", None)
    if base is not None:
        raw = _deep_merge(load_raw(base), raw)
    return raw


def load_config(preset_or_path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw = load_raw(preset_or_path) if preset_or_path else {}
    return from_dict(apply_overrides(raw, overrides or []))


# ----------------------------------------------------------------------------------------------
# validation


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
    _choice(p.optim.name, ("muon", "adamw"), f"{prefix}optim.name")
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
    if t.z_loss < 0:
        raise ConfigError(f"train.z_loss must be >= 0, got {t.z_loss}")
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

"""Building a RunConfig from presets, files and `--set` overrides."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path

import yaml

from slmforge.config.checks import validate
from slmforge.config.tree import (
    FORMAT_VERSION,
    PRESET_DIR,
    ConfigError,
    PhaseConfig,
    RunConfig,
)


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


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
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
            merged[part] = deep_merge(raw.get(part) or {}, phase.get(part) or {})
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
    return list_yaml(PRESET_DIR)


def list_yaml(folder: Path) -> list[str]:
    """The names of the YAML files shipped in `folder` (presets, recipes)."""
    return sorted(p.stem for p in folder.glob("*.yaml"))


def find_yaml(name_or_path: str, folder: Path, kind: str) -> Path:
    """A file path, or the YAML named `name_or_path` in `folder`; a ConfigError lists the `kind`s there."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {kind} '{name_or_path}' ({kind}s: {', '.join(list_yaml(folder))})")
    return path


def read_mapping(path: Path) -> dict:
    """A YAML/JSON file's top-level mapping, or a ConfigError naming the file."""
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
    return with_base(read_mapping(find_yaml(preset_or_path, PRESET_DIR, "preset")))


def with_base(raw: dict) -> dict:
    """`raw` merged over the preset its `base:` key names (recursively), without the key."""
    raw = dict(raw)
    base = raw.pop("base", None)
    return raw if base is None else deep_merge(load_raw(base), raw)


def load_config(preset_or_path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw = load_raw(preset_or_path) if preset_or_path else {}
    return from_dict(apply_overrides(raw, overrides or []))

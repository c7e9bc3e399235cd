"""Building a RunConfig from presets, files and `--set` overrides."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
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


def _show(value) -> str:
    """A value as YAML spells it (null, true), for messages."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _json_pairs(pairs: list) -> dict:
    """json's object_pairs_hook refusing a key given twice (json, too, keeps the last)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"duplicate key {key!r}")
        out[key] = value
    return out


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
        try:  # PyYAML reads "1e-4" (no dot) and "1.0e6" (no sign) as strings; "nan" is checked later
            return float(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"{key}: expected float, got {_show(value)}") from None
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{key}: expected {hint.__name__}, got {_show(value)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_show(value)}")
        return [_check_type(v, args[0], f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_show(value)}")
        return {str(k): _check_type(v, args[1], f"{key}.{k}") for k, v in value.items()}
    return value


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):  # null too: it must not silently become the default section
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {_show(raw)}")
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
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping, got {_show(raw)}")
    raw = copy.deepcopy(raw)
    version = raw.pop("format_version", FORMAT_VERSION)
    if type(version) is not int or version != FORMAT_VERSION:  # true == 1.0 == 1 in Python
        raise ConfigError(f"format_version: this slmforge reads version {FORMAT_VERSION}, got {_show(version)}")
    raw_phases = raw.pop("phases", None)  # null: no phases, e.g. to drop a base preset's
    raw_phases = [] if raw_phases is None else raw_phases
    if not isinstance(raw_phases, list):
        raise ConfigError(f"phases: expected a list of phases, got {_show(raw_phases)}")
    cfg = _build(RunConfig, raw, "")
    phases = []
    for i, phase in enumerate(raw_phases):
        if not isinstance(phase, dict):
            raise ConfigError(f"phases.{i}: expected a mapping, got {_show(phase)}")
        merged = {"name": f"phase{i}", "steps": cfg.train.steps}
        for part in ("data", "optim", "schedule"):
            over = phase.get(part, {})  # not a mapping (null too): _build names phases.i.part
            merged[part] = deep_merge(raw.get(part, {}), over) if isinstance(over, dict) else over
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
        parsed = yaml.load(value, Loader=_Loader) if value != "" else ""
    except yaml.constructor.ConstructorError as e:  # e.g. a duplicate key in a flow mapping
        raise ConfigError(f"override '{item}': {e.problem}") from None
    except yaml.YAMLError:  # not YAML: the text itself
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
            if not isinstance(node, (dict, list)):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"override '{item}': {where} is {_show(node)}, not a mapping")
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
    shipped = folder / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a file")
    # a name that can only be a path is reported as a missing file, not as an unknown preset
    if "/" in name_or_path or os.sep in name_or_path or path.suffix in (".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path}: no such file")
    raise ConfigError(f"unknown {kind} '{name_or_path}' ({kind}s: {', '.join(list_yaml(folder))})")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: where, what, and the construct it was reading."""
    mark, problem, context = (getattr(e, k, None) for k in ("problem_mark", "problem", "context"))
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + (f"{problem} ({context})" if problem and context else problem or context or str(e))


def read_mapping(path: Path) -> dict:
    """A YAML/JSON file's top-level mapping, or a ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if path.suffix == ".json":
            raw = json.loads(text, object_pairs_hook=_json_pairs)
        else:
            raw = yaml.load(text, Loader=_Loader)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def load_raw(preset_or_path: str, _chain: tuple[Path, ...] = ()) -> dict:
    """The raw mapping of a preset name or a YAML/JSON file, with `base:` presets merged in.
    `_chain`: the files whose `base:` led here, to refuse a cycle."""
    path = find_yaml(preset_or_path, PRESET_DIR, "preset")
    if any(path.resolve() == p.resolve() for p in _chain):
        raise ConfigError(f"base: cycle {' -> '.join(map(str, (*_chain, path)))}")
    return with_base(read_mapping(path), (*_chain, path))


def with_base(raw: dict, _chain: tuple[Path, ...] = ()) -> dict:
    """`raw` merged over the preset its `base:` key names (recursively), without the key."""
    raw = dict(raw)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        where = f"{_chain[-1]}: " if _chain else ""
        raise ConfigError(f"{where}base: expected a preset name or a file path, got {_show(base)}")
    return deep_merge(load_raw(base, _chain), raw)


def load_config(preset_or_path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw = load_raw(preset_or_path) if preset_or_path else {}
    return from_dict(apply_overrides(raw, overrides or []))

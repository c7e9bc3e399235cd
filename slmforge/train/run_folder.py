"""What a run folder may hold, what `--fresh` may delete, and what `--resume` may change.

A run folder holds only what slmforge writes into it: config.json, metrics.jsonl, report.json, a recipe's
data-meta.json, one folder per phase holding step_N checkpoints, and `eval/` holding the <task>.json results
of `slmforge eval --task`. `--fresh` deletes a folder only when everything in it is of that kind, so
pointing `--out` at a folder of the user's own files loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from slmforge.checkpoint.folder import STEP_DIR, TMP_PREFIX
from slmforge.checkpoint.integrity import CheckpointError, read_json
from slmforge.config import RunConfig
from slmforge.train import distributed
from slmforge.train.errors import TrainingError

RUN_FILES = ("config.json", "metrics.jsonl", "report.json", "data-meta.json")
EVAL_DIR = "eval"  # slmforge.eval.task.eval_folder
# Settings that change no number of the training itself: they may differ between sessions of a run.
BOOKKEEPING = {"init", "log_every", "eval_every", "save_every", "keep_last", "max_bad_steps", "rank_check_every",
               "rank_warn_ratio", "eval_batches", "compile", "threads"}


def foreign_entries(out: Path) -> list[str]:
    """The entries of `out` that slmforge did not write as part of a run (empty: it is a run folder)."""
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.is_file() and entry.name in RUN_FILES:
            continue
        if entry.is_dir() and not entry.is_symlink() and _is_phase_folder(entry):
            continue
        if entry.name == EVAL_DIR and entry.is_dir() and not entry.is_symlink() and _is_eval_folder(entry):
            continue
        foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    if (out / "config.json").is_file() and not _is_run_config(out / "config.json"):
        foreign.append("config.json (not a slmforge run config)")
    return foreign


def _is_eval_folder(folder: Path) -> bool:
    """`eval/` as `slmforge eval --task` writes it: <task>.json files (and a killed write's .<task>.json.tmp)."""
    return all(p.is_file() and not p.is_symlink() and p.name.endswith((".json", ".json.tmp"))
               for p in folder.iterdir())


def _is_phase_folder(folder: Path) -> bool:
    return all(p.is_dir() and (STEP_DIR.match(p.name) or p.name.startswith(f"{TMP_PREFIX}step_"))
               for p in folder.iterdir())


def _is_run_config(path: Path) -> bool:
    try:
        raw = read_json(path)
    except CheckpointError:
        return False
    return "format_version" in raw and isinstance(raw.get("model"), dict)


def check_run_dir(out: Path, resume: bool, fresh: bool) -> None:
    """Refuse, before anything is written, a run folder that cannot be used as asked."""
    if resume and fresh:
        raise TrainingError("--resume and --fresh contradict each other: pass one of them")
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (resume or fresh):
        raise TrainingError(f"run folder {out} is not empty: pass --resume to continue it or --fresh to delete it")
    foreign = foreign_entries(out) if fresh else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise TrainingError(f"--fresh refuses to delete {out}: it is not a slmforge run folder (it holds what "
                             f"slmforge did not write: {shown}); choose another --out or empty it yourself")


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def _same_data(a: str | None, b: str | None) -> bool:
    """Two data paths hold the same prepared dataset (it may have been moved)."""
    if a == b:
        return True
    try:
        meta_a, meta_b = (json.loads(Path(p).joinpath("meta.json").read_text()) for p in (a, b))
        return meta_a == meta_b
    except (OSError, TypeError, ValueError):
        return False


def config_changes(saved: RunConfig, saved_world: int, current: RunConfig, world: int) -> list[str]:
    """The settings of `current` that differ from a checkpoint's and change what training computes: each as
    'key: old -> new'. The model is compared elsewhere; bookkeeping settings may change freely, data may
    move, and a batch may be split over a different number of processes as long as its total is the same."""
    old, new = _flatten(dataclasses.asdict(saved)), _flatten(dataclasses.asdict(current))
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key.startswith("model.") or (key.startswith("train.") and key.removeprefix("train.") in BOOKKEEPING):
            continue
        if key.endswith("data.path") and _same_data(a, b):
            continue
        if key.endswith("data.batch_size") and a is not None and b is not None:
            if a * saved_world != b * world:
                changes.append(f"{key} x processes: {a} x {saved_world} -> {b} x {world}")
            continue
        if a != b:
            changes.append(f"{key}: {a!r} -> {b!r}")
    return changes


def prepare_run_dir(out: Path, fresh: bool, d: distributed.Dist) -> None:
    if d.is_main:
        if fresh and out.is_dir():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier(d)  # nobody touches the folder before rank 0 has cleared and made it

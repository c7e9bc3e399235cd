"""A checkpoint's own record of its files, and readers that name the file they fail on.

Every checkpoint folder holds `checksums.sha256`, in the format `sha256sum` writes and checks
(`cd step_N && sha256sum -c checksums.sha256`): one line per file, its SHA-256 and its path inside the
folder. It is written last, so a folder without it was never finished. Loading recomputes the sums of the
files it reads, so truncated files and flipped bytes are found before any tensor is used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

CHECKSUMS = "checksums.sha256"
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, is damaged, or does not fit the model it is loaded into."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """Record the SHA-256 of every file under `folder` (call it after the last file is written)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    (folder / CHECKSUMS).write_text("".join(lines))


def read_checksums(folder: Path) -> dict[str, str]:
    """{path inside the folder: SHA-256} from the folder's checksums file."""
    path = folder / CHECKSUMS
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CHECKSUMS}, so the checkpoint was never finished "
                              "(its writer stopped before the end)")
    sums = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            raise CheckpointError(f"{path} is damaged (line {number} is not '<sha256>  <file>')")
        sums[name] = digest
    return sums


def verify_files(folder: Path, names: Iterable[str] | None = None) -> None:
    """Check `names` (default: every recorded file) against the checksums; a CheckpointError names the
    first file that is missing or damaged."""
    sums = read_checksums(folder)
    for name in sums if names is None else names:
        path = folder / name
        if name not in sums:
            raise CheckpointError(f"{path} is not recorded in {folder / CHECKSUMS}")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if file_sha256(path) != sums[name]:
            raise CheckpointError(f"{path} is damaged: its SHA-256 differs from the one recorded when it was "
                                  "written (truncated or altered)")


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a CheckpointError names the file when it is missing or not JSON."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is damaged (not valid JSON: {e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is damaged (expected a JSON object)")
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    """Write a JSON file whole or not at all: a killed writer leaves the previous version in place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a CheckpointError names the file when it cannot be read."""
    try:
        return load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged or not a safetensors file ({e})") from None


def check_weights(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Every name, shape and kind of dtype accounted for, and no NaN or inf in the weights."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(tensors[k].shape)}, model {tuple(v.shape)}"
                  for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    # a float weight stored as integers (or the reverse) would be cast silently by load_state_dict
    wrong_dtype = [f"{k}: checkpoint {_dtype(tensors[k])}, model {_dtype(v)}" for k, v in expected.items()
                   if k in tensors and tensors[k].is_floating_point() != v.is_floating_point()]
    problems = [_listed("missing weights", missing), _listed("unexpected weights", unexpected),
                _listed("shape mismatches", mismatched), _listed("dtype mismatches", wrong_dtype)]
    if any(problems):
        raise CheckpointError(f"{source} does not fit the model; " + "; ".join(p for p in problems if p))
    not_finite = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not_finite:
        shown = ", ".join(f"{k} ({_count_not_finite(tensors[k])})" for k in not_finite[:5])
        more = f" and {len(not_finite) - 5} more" if len(not_finite) > 5 else ""
        raise CheckpointError(f"{source} holds NaN or inf in {shown}{more}: the model would emit garbage")


def _listed(what: str, names: list[str], shown: int = 8) -> str:
    """'what: [first names]' with the count of the rest, so a wholly different model reads in one line."""
    if not names:
        return ""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{what}: {names[:shown]}{more}"


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _count_not_finite(t: torch.Tensor) -> str:
    n = int((~torch.isfinite(t)).sum())
    return f"{n:,} of {t.numel():,} values" if n != t.numel() else "every value"


"""Checkpoint folders: written atomically, found again, verified, read strictly.

    step_N/                       the state after N optimizer steps of a phase
      config.json                 the resolved RunConfig (with format_version): the model's identity
      model.safetensors           fp32 weights; a tied embedding is stored once (no lm_head.weight)
      tokenizer.json, tokenizer_config.json
      adapter.safetensors         with LoRA (config `lora`): the adapters alone, "<module>.lora_A" / "lora_B"
      adapter_config.json         (model.safetensors then holds the weights with the adapters merged in)
      trainer_state/
        optimizer.safetensors     optimizer state, "<param name>/<state key>" -> tensor
        rng.safetensors           torch RNG states
        state.json                step, phase, tokens seen, skips, val losses, optimizer metadata
      checksums.sha256            SHA-256 of every file above, written last (see integrity.py)

A checkpoint is written to `.tmp-step_N` next to its final place, fsynced, then renamed: a crash leaves
either the whole folder or none. No pickle anywhere: tensors in safetensors, the rest in JSON. Loading
from a run folder takes its newest intact checkpoint: a damaged one is named and passed over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from slmforge.checkpoint.integrity import (
    CHECKSUMS,
    CheckpointError,
    check_weights,
    read_checksums,
    read_json,
    read_tensors,
    verify_files,
    write_checksums,
)
from slmforge.config import ConfigError, RunConfig, from_dict
from slmforge.tokenizer import Tokenizer, load_tokenizer

STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"
COMPILE_PREFIX = "_orig_mod."  # what torch.compile puts in front of every parameter name
TRAINER_STATE = "trainer_state"
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


def _tensors_for_file(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    try:
        save_file(_tensors_for_file(tensors), path, metadata=metadata)
    except SafetensorError as e:  # a full disk surfaces here as an I/O error inside safetensors
        raise CheckpointError(f"cannot write {path}: {e}") from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in [*sorted(folder.rglob("*")), folder]:
        _fsync(path)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def to_stderr(message: str) -> None:
    """The default way warnings about checkpoints reach the user."""
    tqdm.write(message, file=sys.stderr)  # through tqdm: a progress bar on the screen stays whole


def rng_tensors() -> dict[str, torch.Tensor]:
    """The torch RNG states of the CPU and of the current CUDA device, as uint8 tensors."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["torch_cuda"])


def save_checkpoint(
    folder: Path,
    *,
    cfg: RunConfig,
    model_state: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    optimizer_tensors: dict[str, torch.Tensor],
    state: dict,
    keep_last: int | None,
    adapter: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> Path:
    """Write checkpoint `folder` (…/step_N) atomically, replacing one already there once the new one is
    complete; then keep only the newest `keep_last` step_N folders beside it (None: touch nothing else).
    `adapter`: LoRA's tensors and their description, written beside the merged weights."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_unfinished(folder.parent)
    tmp = folder.parent / f"{TMP_PREFIX}{folder.name}"
    tmp.mkdir()
    try:
        cfg.save(tmp / "config.json")
        _save_tensors(model_state, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save(tmp)
        if adapter is not None:
            _save_tensors(adapter[0], tmp / ADAPTER_FILE, metadata={"format": "pt"})
            _write_json(tmp / ADAPTER_CONFIG, adapter[1])
        (tmp / TRAINER_STATE).mkdir()
        _save_tensors(optimizer_tensors, tmp / TRAINER_STATE / "optimizer.safetensors")
        _save_tensors(rng_tensors(), tmp / TRAINER_STATE / "rng.safetensors")
        _write_json(tmp / TRAINER_STATE / "state.json", state)
        write_checksums(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():  # the same step saved again (a repeated resume): the new one replaces it
        shutil.rmtree(folder)
    os.rename(tmp, folder)
    _fsync(folder.parent)  # the rename itself
    for old in list_checkpoints(folder.parent)[:-keep_last] if keep_last else []:
        shutil.rmtree(old)
    return folder


def remove_unfinished(phase_dir: Path) -> None:
    """Delete the temporary folders of checkpoints whose writer was killed before renaming them."""
    for stale in Path(phase_dir).glob(f"{TMP_PREFIX}step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(phase_dir: Path) -> list[Path]:
    """Checkpoint folders (step_N) in `phase_dir`, oldest first; intact or not."""
    if not phase_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in phase_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def read_state(checkpoint: Path) -> dict:
    return read_json(checkpoint / TRAINER_STATE / "state.json")


def _phase_order(run_dir: Path) -> dict[str, int]:
    """Phase name -> index from the run's config.json (the phase folders alone have no order)."""
    try:
        phases = read_json(run_dir / "config.json").get("phases") or [{"name": "main"}]
        return {p["name"]: i for i, p in enumerate(phases) if isinstance(p, dict) and "name" in p}
    except (CheckpointError, OSError):
        return {}


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    """Every checkpoint folder of a run, the latest phase's highest step first."""
    run_dir = Path(run_dir)
    order = _phase_order(run_dir)

    def phase_index(c: Path) -> int:
        if c.parent.name in order:
            return order[c.parent.name]
        try:
            return int(read_state(c).get("phase_index", 0))
        except (CheckpointError, TypeError, ValueError):
            return -1

    candidates = [c for d in run_dir.iterdir() if d.is_dir() for c in list_checkpoints(d)]
    return sorted(candidates, key=lambda c: (phase_index(c), int(STEP_DIR.match(c.name).group(1))), reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint folder of a run, intact or not (None when there is none)."""
    found = checkpoints_newest_first(run_dir) if Path(run_dir).is_dir() else []
    return found[0] if found else None


def is_checkpoint(path: Path) -> bool:
    return (path / "model.safetensors").exists() or (path / CHECKSUMS).exists()


def verify_checkpoint(checkpoint: Path, trainer_state: bool) -> None:
    """Check the files a load reads against the checkpoint's checksums: the model's files, and with
    `trainer_state` the optimizer, RNG and progress files too."""
    names = [n for n in read_checksums(checkpoint) if trainer_state or not n.startswith(f"{TRAINER_STATE}/")]
    verify_files(checkpoint, names)
    if trainer_state and not (checkpoint / TRAINER_STATE / "state.json").is_file():
        raise CheckpointError(f"{checkpoint}: no {TRAINER_STATE}/state.json, so training cannot resume from it")


def find_checkpoint(path: str | Path, trainer_state: bool = False, warn: Callable[[str], None] = to_stderr) -> Path:
    """The checkpoint to load from `path`, verified against its checksums.

    A checkpoint folder must be intact itself. In a run or phase folder, the newest intact checkpoint:
    each damaged one before it is reported through `warn` (naming the damaged file) and passed over.
    """
    path = Path(path)
    if is_checkpoint(path):
        verify_checkpoint(path, trainer_state)
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    candidates = list_checkpoints(path)[::-1] or checkpoints_newest_first(path)
    if not candidates:
        raise CheckpointError(f"{path}: no checkpoint in it (expected step_N folders holding model.safetensors)")
    for checkpoint in candidates:
        try:
            verify_checkpoint(checkpoint, trainer_state)
        except CheckpointError as e:
            warn(f"checkpoint {checkpoint} is unusable: {e}")
            continue
        if checkpoint != candidates[0]:
            warn(f"using {checkpoint}, the newest intact checkpoint")
        return checkpoint
    raise CheckpointError(f"{path}: none of its {len(candidates)} checkpoints is intact (see the messages above)")


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load `tensors` into `model`, every name, shape and dtype kind accounted for and every value finite;
    torch.compile's prefix is dropped."""
    tensors = {k.replace(COMPILE_PREFIX, ""): v for k, v in tensors.items()}
    check_weights(tensors, model.state_dict(), source)
    model.load_state_dict(tensors)


def read_config(checkpoint: Path) -> RunConfig:
    """The checkpoint's own config.json: the model is built from it, never guessed."""
    path = checkpoint / "config.json"
    try:
        return from_dict(read_json(path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_trainer_state(checkpoint: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state.json, optimizer tensors, RNG tensors) of a checkpoint written by the trainer."""
    folder = checkpoint / TRAINER_STATE
    optimizer, rng = read_tensors(folder / "optimizer.safetensors"), read_tensors(folder / "rng.safetensors")
    return read_state(checkpoint), optimizer, rng


def read_tokenizer(checkpoint: Path) -> Tokenizer:
    """The checkpoint's tokenizer; a CheckpointError names a file that does not parse."""
    try:
        return load_tokenizer(checkpoint)
    except ValueError as e:
        raise CheckpointError(f"{checkpoint / 'tokenizer.json'} is damaged ({e})") from None

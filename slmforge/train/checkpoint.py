"""Checkpoint folders: written atomically, found again by resume, loaded strictly.

    step_N/                       the state after N optimizer steps of a phase
      config.json                 the resolved RunConfig (with format_version): the model's identity
      model.safetensors           fp32 weights; a tied embedding is stored once (no lm_head.weight)
      tokenizer.json, tokenizer_config.json
      trainer_state/
        optimizer.safetensors     optimizer state, "<param name>/<state key>" -> tensor
        rng.safetensors           torch RNG states
        state.json                step, phase, tokens seen, skips, val losses, optimizer metadata

A checkpoint is written to `.tmp-step_N` next to its final place, fsynced, then renamed: a crash leaves
either the whole folder or none. No pickle anywhere: tensors in safetensors, the rest in JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slmforge.config import RunConfig, from_dict
from slmforge.model import build_model
from slmforge.tokenizer import Tokenizer, load_tokenizer

STEP_DIR = re.compile(r"^step_(\d+)$")
COMPILE_PREFIX = "_orig_mod."  # what torch.compile puts in front of every parameter name


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or does not fit the model it is loaded into."""


def _tensors_for_file(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


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
    keep_last: int,
) -> Path:
    """Write checkpoint `folder` (…/step_N) atomically, then keep only the newest `keep_last` beside it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(".tmp-step_*"):  # left by a crash mid-save
        shutil.rmtree(stale)
    tmp = folder.parent / f".tmp-{folder.name}"
    tmp.mkdir()
    cfg.save(tmp / "config.json")
    save_file(_tensors_for_file(model_state), tmp / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save(tmp)
    (tmp / "trainer_state").mkdir()
    save_file(_tensors_for_file(optimizer_tensors), tmp / "trainer_state" / "optimizer.safetensors")
    save_file(_tensors_for_file(rng_tensors()), tmp / "trainer_state" / "rng.safetensors")
    _write_json(tmp / "trainer_state" / "state.json", state)
    _fsync_tree(tmp)
    if folder.exists():  # the same step saved again (a repeated resume): the new one replaces it
        shutil.rmtree(folder)
    os.rename(tmp, folder)
    _fsync(folder.parent)  # the rename itself
    for old in list_checkpoints(folder.parent)[:-keep_last]:
        shutil.rmtree(old)
    return folder


def list_checkpoints(phase_dir: Path) -> list[Path]:
    """Complete checkpoints (step_N folders) in `phase_dir`, oldest first."""
    if not phase_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in phase_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def read_state(checkpoint: Path) -> dict:
    path = checkpoint / "trainer_state" / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run folder: the last phase that has one, its highest step."""
    candidates = [c for phase_dir in sorted(p for p in Path(run_dir).iterdir() if p.is_dir())
                  for c in list_checkpoints(phase_dir)]
    if not candidates:
        return None

    def order(c: Path) -> tuple[int, int]:
        return read_state(c).get("phase_index", 0), int(STEP_DIR.match(c.name).group(1))

    return max(candidates, key=order)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the latest checkpoint in a phase or run folder."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    in_phase = list_checkpoints(path)
    found = in_phase[-1] if in_phase else latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint in it (expected step_N folders holding model.safetensors)")
    return found


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load `tensors` into `model`, every name and shape accounted for; torch.compile's prefix is dropped."""
    tensors = {k.replace(COMPILE_PREFIX, ""): v for k, v in tensors.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(tensors[k].shape)}, model {tuple(v.shape)}"
                  for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or mismatched:
        problems = [f"missing weights: {missing}" if missing else "",
                    f"unexpected weights: {unexpected}" if unexpected else "",
                    f"shape mismatches: {mismatched}" if mismatched else ""]
        raise CheckpointError(f"{source} does not fit the model; " + "; ".join(p for p in problems if p))
    model.load_state_dict(tensors)


def read_config(checkpoint: Path) -> RunConfig:
    """The checkpoint's own config.json: the model is built from it, never guessed."""
    path = checkpoint / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{checkpoint}: no config.json, so the model it holds is unknown")
    return from_dict(json.loads(path.read_text()))


def read_trainer_state(checkpoint: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state.json, optimizer tensors, RNG tensors) of a checkpoint written by the trainer."""
    folder = checkpoint / "trainer_state"
    if not (folder / "state.json").is_file():
        raise CheckpointError(f"{checkpoint}: no trainer_state/state.json, so training cannot resume from it")
    return (read_state(checkpoint), load_file(folder / "optimizer.safetensors"), load_file(folder / "rng.safetensors"))


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, RunConfig, Tokenizer]:
    """(model, cfg, tokenizer) from a checkpoint folder, or the latest checkpoint of a run folder.

    The model is built from the checkpoint's own config.json, on the CPU in fp32, in eval mode.
    """
    checkpoint = resolve_checkpoint(path)
    cfg = read_config(checkpoint)
    model = build_model(cfg.model)
    load_weights(model, load_file(checkpoint / "model.safetensors"), str(checkpoint / "model.safetensors"))
    return model.eval(), cfg, load_tokenizer(checkpoint)

"""Loading a model to use it: a checkpoint or run folder -> model, config and tokenizer on a chosen device,
with its compute dtype. Everything that runs a model without training it (eval, sample, export, a server)
loads through here, and none of it imports the trainer."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from slmforge.checkpoint import find_checkpoint, load_weights, read_config, read_tensors, read_tokenizer
from slmforge.checkpoint.folder import to_stderr
from slmforge.config import RunConfig
from slmforge.hardware import autocast, choose_device, choose_dtype
from slmforge.model import build_model
from slmforge.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """A model ready to run: fp32 weights on `device` in eval mode; forward passes under `autocast()`
    compute in `dtype`."""

    model: torch.nn.Module
    config: RunConfig
    tokenizer: Tokenizer
    checkpoint: Path
    device: torch.device
    dtype: torch.dtype
    dtype_reason: str

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)


def load_model(path: str | Path, device: str = "auto", dtype: str | None = None,
               warn: Callable[[str], None] = to_stderr) -> LoadedModel:
    """The model of a checkpoint folder, or of the newest intact checkpoint of a run or phase folder (a
    damaged newer one is reported through `warn`). `device`: "auto" (CUDA when there is one), "cpu",
    "cuda[:N]"; `dtype`: "auto" | "bf16" | "fp32", by default the checkpoint's own train.dtype."""
    checkpoint = find_checkpoint(path, warn=warn)
    cfg = read_config(checkpoint)
    model = build_model(cfg.model)
    load_weights(model, read_tensors(checkpoint / "model.safetensors"), str(checkpoint / "model.safetensors"))
    tokenizer = read_tokenizer(checkpoint)
    target = choose_device(device)
    compute, reason = choose_dtype(dtype or cfg.train.dtype, target, "dtype" if dtype else "train.dtype")
    return LoadedModel(model.to(target).eval(), cfg, tokenizer, checkpoint, target, compute, reason)


DECODE_WEIGHTS = ("fp32", "bf16", "f16", "int8")


def load_for_decoding(path: str | Path, device: str = "auto", weights: str = "fp32", max_batch: int = 1,
                      warn: Callable[[str], None] = to_stderr) -> LoadedModel:
    """`load_model` for generation: weights held as `weights` ("fp32"; "bf16" or "f16": the whole model in
    that dtype, half the bytes per token; "int8": the per-token matrices in int8, see
    `slmforge.infer.kernels`) and the model prepared for decoding up to `max_batch` sequences at once."""
    from slmforge.infer.kernels import prepare_for_decoding

    if weights not in DECODE_WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(DECODE_WEIGHTS)}, got {weights!r}")
    loaded = load_model(path, device=device, dtype="fp32", warn=warn)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}.get(weights, torch.float32)
    loaded.model.to(dtype)
    prepare_for_decoding(loaded.model, "int8" if weights == "int8" else "float", batch_rows=max_batch)
    loaded.dtype, loaded.dtype_reason = dtype, f"weights={weights}"
    return loaded

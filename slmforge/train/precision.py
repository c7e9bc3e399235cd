"""Which dtype the forward pass computes in, and why. Master weights and optimizer state stay fp32."""

from __future__ import annotations

import contextlib

import torch

from slmforge.hardware import cpu_has_fast_bf16


def choose_dtype(setting: str, device: torch.device) -> tuple[torch.dtype, str]:
    """(compute dtype, a sentence saying why) for train.dtype = "auto" | "bf16" | "fp32"."""
    if setting == "fp32":
        return torch.float32, "fp32: train.dtype=fp32"
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        fast = cpu_has_fast_bf16()
        where = "this CPU"
    if setting == "bf16":
        note = "" if fast else f" ({where} has no fast bf16: expect it to be much slower than fp32)"
        return torch.bfloat16, f"bf16 autocast: train.dtype=bf16{note}"
    if fast:
        return torch.bfloat16, f"bf16 autocast: train.dtype=auto and {where} has fast bf16"
    return torch.float32, f"fp32: train.dtype=auto and {where} has no fast bf16 (bf16 matmuls would be slower)"


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """A reusable context for forward passes: bf16 autocast, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)

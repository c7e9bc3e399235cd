"""What the machine can do fast; consulted by the trainer and optimizers, never by model code."""

from functools import cache

import torch


@cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matmul units (AVX512-BF16 / AMX); elsewhere bf16 is ~100x slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # builds without oneDNN
        return False

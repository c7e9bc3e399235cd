"""Device, compute dtype and threads, decided in one place for training and inference from what the machine
can do fast; consulted by the trainer, the optimizers and the model loader, never by model code."""

from __future__ import annotations

import contextlib
import ctypes
import os
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used, so that commands that never touch a tensor start fast
    import torch

# Work (FLOPs) per forward-and-backward micro-step below which a second CPU thread loses time: see
# choose_threads and benchmarks/bench_threads.py.
ONE_THREAD_BELOW_FLOPS = 2e9


@cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matmul units (AVX512-BF16 / AMX); elsewhere bf16 is ~100x slower than fp32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # builds without oneDNN
        return False


def keep_freed_memory() -> None:
    """Stop glibc from returning large freed blocks to the OS.

    Every training step allocates and frees the same activation-sized buffers; by default glibc serves
    each with a fresh mmap, and the kernel zero-fills its pages again on first touch. Keeping them in
    the heap measured 1.8x the tokens/s of the quickstart model on 2 CPU cores. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    one_gib = 1 << 30
    libc.mallopt(-3, one_gib)  # M_MMAP_THRESHOLD: serve blocks below this from the heap
    libc.mallopt(-1, one_gib)  # M_TRIM_THRESHOLD: keep this much free memory at the heap's top


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_threads(setting: int, flops_per_step: float, step: str = "a micro-step",
                   key: str = "train.threads") -> tuple[int, str]:
    """(torch intra-op threads for CPU work, a sentence saying why) for `key` = `setting` (training: a micro-step
    of forward and backward; decoding: one step of a batch).

    0 chooses: one thread when a micro-step is small, because OpenMP threads that wait for each other
    spin, and on a machine doing other work they then take turns with it, which made a tiny model ~30x
    slower; all the CPUs this process may use otherwise. OMP_NUM_THREADS, when set, is respected.
    """
    if setting:
        return setting, f"{setting} thread{'s' * (setting > 1)}: {key}={setting}"
    if os.environ.get("OMP_NUM_THREADS"):
        n = max(int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else 1, 1)
        return n, f"{n} thread{'s' * (n > 1)}: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    if flops_per_step < ONE_THREAD_BELOW_FLOPS:
        return 1, f"1 thread: {step} is {flops_per_step / 1e9:.2g} GFLOP, too little to share ({key} sets it)"
    n = cpu_count()
    return n, f"{n} threads: the CPUs this process may use ({key} sets it)"


def choose_device(setting: str = "auto") -> torch.device:
    """The device for `setting`: "auto" is the current CUDA device when there is one, else the CPU."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise ValueError(f"device {setting!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {setting!r}: no CUDA device is available here")
    return device


def choose_dtype(setting: str, device: torch.device, key: str = "train.dtype") -> tuple[torch.dtype, str]:
    """(compute dtype, a sentence saying why) for `key` = "auto" | "bf16" | "fp32". Weights stay fp32."""
    import torch

    if setting == "fp32":
        return torch.float32, f"fp32: {key}=fp32"
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        fast = cpu_has_fast_bf16()
        where = "this CPU"
    if setting == "bf16":
        note = "" if fast else f" ({where} has no fast bf16: expect it to be much slower than fp32)"
        return torch.bfloat16, f"bf16 autocast: {key}=bf16{note}"
    if fast:
        return torch.bfloat16, f"bf16 autocast: {key}=auto and {where} has fast bf16"
    return torch.float32, f"fp32: {key}=auto and {where} has no fast bf16 (bf16 matmuls would be slower)"


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """A reusable context for forward passes: bf16 autocast, or nothing for fp32."""
    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)

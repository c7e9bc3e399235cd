"""What the machine can do fast; consulted by the trainer and optimizers, never by model code."""

import ctypes
import os
from functools import cache

# Work (FLOPs) per forward-and-backward micro-step below which a second CPU thread loses time: see
# choose_threads and benchmarks/bench_threads.py.
ONE_THREAD_BELOW_FLOPS = 2e9


@cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matmul units (AVX512-BF16 / AMX); elsewhere bf16 is ~100x slower than fp32."""
    import torch  # here, so that commands that never touch a tensor start without it

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


def choose_threads(setting: int, flops_per_step: float) -> tuple[int, str]:
    """(torch intra-op threads for CPU training, a sentence saying why) for train.threads = `setting`.

    0 chooses: one thread when a micro-step is small, because OpenMP threads that wait for each other
    spin, and on a machine doing other work they then take turns with it, which made a tiny model ~30x
    slower; all the CPUs this process may use otherwise. OMP_NUM_THREADS, when set, is respected.
    """
    if setting:
        return setting, f"{setting} threads: train.threads={setting}"
    if os.environ.get("OMP_NUM_THREADS"):
        n = int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else 1
        return max(n, 1), f"{max(n, 1)} threads: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    if flops_per_step < ONE_THREAD_BELOW_FLOPS:
        return 1, (f"1 thread: a micro-step is {flops_per_step / 1e9:.2g} GFLOP, too little to share "
                   "(train.threads sets it)")
    n = cpu_count()
    return n, f"{n} threads: the CPUs this process may use (train.threads sets it)"

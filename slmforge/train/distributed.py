"""Data parallelism: the same training loop on every process, one process per device (torchrun).

Under `torchrun --nproc_per_node N` (WORLD_SIZE > 1) each rank draws its own rows of every batch,
DDP averages the gradients, and every rank then takes the same optimizer step. Rank 0 alone writes files.
Without torchrun all of this collapses to a single process and no process group.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # we created the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> Dist:
    """Join the process group torchrun describes in the environment (nccl on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        on_cuda = device.type == "cuda"
        dist.init_process_group("nccl" if on_cuda else "gloo", device_id=device if on_cuda else None)
        owns_group = True
    return Dist(rank, world_size, device, owns_group)


def teardown(d: Dist) -> None:
    if d.owns_group:
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    return all_reduce_sum(t, d) / d.world_size


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DDP around `model` in a distributed run; the model itself otherwise."""
    if not d.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def grad_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on micro-steps before the last one of an accumulation."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()

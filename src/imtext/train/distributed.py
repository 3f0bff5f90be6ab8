"""Process-group setup for data-parallel training under ``torchrun`` (gloo on CPU, NCCL on GPU).

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) training runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from imtext.device import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str) -> Dist:
    """Join the ``torchrun`` process group if there is one; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size == 1:
        return Dist(0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, device)


def teardown(info: Dist) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_flag(info: Dist, value: bool) -> bool:
    """The main process's ``value`` on every process (e.g. "stop early")."""
    if info.world_size == 1:
        return value
    flag = torch.tensor([float(value)], device=info.device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def barrier(info: Dist) -> None:
    if info.world_size > 1:
        dist.barrier()

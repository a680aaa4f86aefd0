"""PyTorch distributed under `torchrun`: which rank this is, and the process group for DDP training.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int          # global rank (0 = the one that writes run folders)
    size: int          # number of processes
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_world(device: str) -> World:
    """Join torchrun's process group (gloo on CPU, nccl on GPU) and pick this rank's device."""
    rank, size = world_from_env()
    dev = torch.device(device)
    if size > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(rank, size, dev)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

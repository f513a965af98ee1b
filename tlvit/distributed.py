"""torch.distributed through one code path: 1 process, N local processes, or Slurm/submitit tasks.

The environment decides: torchrun / submitit set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT;
under plain `srun` the SLURM_* variables are read. gloo on CPU, nccl on GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Join the process group named by the environment (no-op for a single process)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    else:
        return DistEnv()
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in env:
            raise RuntimeError("distributed run without MASTER_ADDR/MASTER_PORT: launch with torchrun or tlvit's Slurm launcher")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistEnv(rank, world, local)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (identity for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()

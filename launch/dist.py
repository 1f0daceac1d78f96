"""Distributed environment detection (torchrun, SLURM, single process) and small collective helpers."""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that use it: detect_env() serves data_prep, whose commands (and every
# worker they start) must not pay torch's import time (seconds) just to read a few environment variables.


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def detect_env() -> DistEnv:
    """Read rank/world from torchrun variables, falling back to SLURM's (one task per GPU)."""
    rank = _first_int("RANK", "SLURM_PROCID", default=0)
    world = _first_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _first_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    local_world = _first_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=1)
    return DistEnv(rank, world, local_rank, local_world)


def free_port() -> int:
    """A TCP port free on this host right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_env(env: DistEnv | None = None) -> DistEnv:
    """Make sure RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT are set.

    DeepSpeed and torch.distributed read these; a plain ``python`` process without them makes DeepSpeed try MPI.
    """
    env = env or detect_env()
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(env.local_world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if env.world_size > 1:
            raise RuntimeError("MASTER_PORT is not set for a multi-process job; start it with torchrun or launch")
        os.environ["MASTER_PORT"] = str(free_port())
    return env


def default_backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None) -> DistEnv:
    """Initialise the default process group once (also for world size 1, so collectives always work)."""
    import torch
    import torch.distributed as dist

    env = export_env()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank % max(torch.cuda.device_count(), 1))
        dist.init_process_group(backend=backend or default_backend(), rank=env.rank, world_size=env.world_size)
    return env


def device() -> torch.device:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_max(value: float) -> float:
    """Max of a scalar over ranks (identity without a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum(value: float) -> float:
    """Sum of a scalar over ranks (identity without a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def broadcast_object(obj: object, src: int = 0) -> object:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _collective_device() -> torch.device:
    import torch
    import torch.distributed as dist

    return device() if dist.get_backend() == "nccl" else torch.device("cpu")

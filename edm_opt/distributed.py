"""Process group from torchrun's environment: gloo on CPU, NCCL on CUDA; plain `python` is world size 1."""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .localrun import LOCALRUN_ENV, STORE_FD_ENV


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()


def read_env(device: str = "auto") -> DistEnv:
    """Rank, local rank and world size from torchrun's variables (1 process without them), and the device."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return DistEnv(rank, local_rank, world, dev)


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Linux: deliver `signum` to this process when its parent dies, even by SIGKILL (PR_SET_PDEATHSIG), so that no
    orphaned process trains on into a run directory the next attempt trains into too; elsewhere: nothing."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signum))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call: the signal will not come
        os.kill(os.getpid(), signum)


def init(env: DistEnv, timeout_s: int = 1800) -> None:
    """Start the process group (NCCL on CUDA, gloo on CPU) when torchrun or `edm_opt.localrun` launched several
    processes; each rank stops (SIGTERM: a checkpoint at the end of its step) when its launcher dies. Under localrun
    the store is the loopback socket the launcher bound (rank 0 hosts it), not one on every interface."""
    launched = "TORCHELASTIC_RUN_ID" in os.environ or LOCALRUN_ENV in os.environ
    if launched:
        die_with_parent()
    if env.world_size <= 1 or dist.is_initialized():
        return
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if LOCALRUN_ENV not in os.environ:
        dist.init_process_group(backend, timeout=timeout)
        return
    fd = os.environ.get(STORE_FD_ENV)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                          is_master=fd is not None, timeout=timeout,
                          master_listen_fd=int(fd) if fd is not None else None)
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(env: DistEnv, t: torch.Tensor) -> None:
    """In-place sum over ranks of a CPU tensor (moved through the device for NCCL)."""
    if not env.active:
        return
    if env.device.type == "cuda":
        d = t.to(env.device)
        dist.all_reduce(d)
        t.copy_(d.cpu())
    else:
        dist.all_reduce(t)


def broadcast_object(env: DistEnv, obj):
    """rank 0's object on every rank."""
    if not env.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(env: DistEnv, obj) -> list:
    """Every rank's object, on every rank (a list ordered by rank)."""
    if not env.active:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()

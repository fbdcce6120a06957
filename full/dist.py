"""torchrun / DDP helpers. Launched by torchrun (RANK, LOCAL_RANK, WORLD_SIZE in the environment) we join a
process group (NCCL on CUDA, gloo on CPU); launched plainly we start none and every helper is a no-op.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

import full
from cm import pick_device


def launched() -> bool:
    """True when started by torchrun (or anything else that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str = "") -> torch.device:
    """Pick the device (`device`, else cuda:LOCAL_RANK if CUDA is present, else cpu) and, under torchrun,
    join the process group. Returns the device this rank computes on."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index if dev.index is not None else local)
        torch.cuda.set_device(dev)
    if launched() and not dist.is_initialized():
        full.die_with_parent()
        # one node: a peer that has not joined in 10 minutes is gone (a standalone run waits no longer);
        # several nodes may start minutes apart, and slow shared file systems stall barriers
        one_node = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]) == os.environ["WORLD_SIZE"]
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=10 if one_node else 30),
                                device_id=dev if dev.type == "cuda" else None)
    return dev


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world() -> int:
    return dist.get_world_size() if enabled() else 1


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if enabled():
        dist.barrier()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a one-element list without a process group)."""
    if not enabled():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def all_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (on a copy)."""
    t = t.detach().clone()
    if enabled():
        dist.all_reduce(t)
        t /= world()
    return t


@contextlib.contextmanager
def ddp_sync(module: torch.nn.Module, sync: bool):
    """Gradient all-reduce only when `sync` (the last accumulation round): `no_sync()` otherwise."""
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield


def cleanup() -> None:
    if enabled():
        dist.destroy_process_group()

"""Process-group helpers shared by the tools, the study script and the tests."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = [
    "LOSSY_GROUPS",
    "collective_device",
    "free_port",
    "init_from_environment",
    "init_single_process_group",
    "lossy_kinds",
    "reliable",
    "reliable_now",
    "single_process_group",
]


def collective_device(group: object = None) -> torch.device:
    """The device a collective over ``group`` needs its tensors on: the current CUDA device
    for NCCL, else the CPU (Gloo, MPI)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# The lossy process groups of this process: group name -> the kinds of collective that lose
# (lossy_hooks.group.lossy_group registers them); read by the DDP hook, which refuses to
# lose packets a second time on a group that already loses its all-reduces.
LOSSY_GROUPS: dict[str, frozenset[str]] = {}
_RELIABLE = [0]  # depth of reliable() regions, process-wide


def lossy_kinds(group: object) -> frozenset[str]:
    """The kinds of collective ``group`` loses packets of (empty for a plain group)."""
    name = getattr(group, "group_name", None)
    return LOSSY_GROUPS.get(name, frozenset()) if isinstance(name, str) else frozenset()


@contextlib.contextmanager
def reliable() -> Iterator[None]:
    """Inside (in every thread of this process), a lossy process group carries every
    collective without loss: control traffic (setting a model up, this package's own count
    and statistics exchanges, anything a user marks)."""
    _RELIABLE[0] += 1
    try:
        yield
    finally:
        _RELIABLE[0] -= 1


def reliable_now() -> bool:
    """Whether a :func:`reliable` region is open."""
    return _RELIABLE[0] > 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_group(backend: str = "gloo") -> None:
    """A process group of one rank on this machine (world size 1), no launcher needed."""
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


@contextlib.contextmanager
def single_process_group(backend: str = "gloo") -> Iterator[None]:
    """Inside: a process group, this process's own one-rank group unless one already exists
    (then that one is used and left as it is)."""
    if dist.is_initialized():
        yield
        return
    init_single_process_group(backend)
    try:
        yield
    finally:
        dist.barrier()  # with gc before destroy: stopped rare aborts at exit
        dist.destroy_process_group()


def init_from_environment(backend: str = "auto") -> tuple[int, int, torch.device]:
    """The process group of a torchrun worker (or a one-rank group without torchrun), and this
    rank's device: ``backend="auto"`` is NCCL on GPUs, else Gloo. Returns (rank, world, device)."""
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    else:  # plain `python train_ddp.py`: a one-process group, same code path
        init_single_process_group(backend)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return dist.get_rank(), dist.get_world_size(), device

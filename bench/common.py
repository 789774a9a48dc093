"""What the benchmarks share: a worker process's start (device, threads, process group) and
the one summary of timings against a reference, paired by repetition."""

from __future__ import annotations

import os
import statistics

import torch
import torch.distributed as dist

__all__ = ["paired_ratios", "start_worker"]


def start_worker(rank: int, world: int, port: int, cpu: bool) -> torch.device:
    """Rank ``rank`` of ``world`` on this machine: its device (its own GPU, or the CPU with one
    thread where there is none or ``cpu`` is asked for) and the default process group (NCCL
    on GPUs, Gloo on the CPU) at ``127.0.0.1:port``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and not cpu
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return device


def paired_ratios(seconds: list[float], base: list[float]) -> dict[str, float]:
    """``seconds[i]`` against the reference's ``base[i]`` of the same repetition: the ratio of
    the medians, and the median and quartiles of the per-repetition ratios (robust to the
    machine's drifts between repetitions)."""
    ratios = sorted(s / b for s, b in zip(seconds, base, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "ratio_of_medians": statistics.median(seconds) / statistics.median(base),
        "paired_ratio_median": statistics.median(ratios),
        "paired_ratio_q1": q[0],
        "paired_ratio_q3": q[2],
    }

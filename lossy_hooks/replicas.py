"""Replica drift and re-synchronisation, for post drops drawn independently per rank.

With ``post_sync="independent"`` each rank receives a differently damaged aggregate, so the
model replicas drift apart. Drift of rank ``r``: ``|theta_r - theta_bar| / |theta_bar|`` with
``theta_bar`` the mean of the replicas' parameter vectors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["replica_drift", "resync_replicas"]


@torch.no_grad()
def replica_drift(module: nn.Module, group: dist.ProcessGroup | None = None) -> tuple[float, float]:
    """``(max, mean)`` over ranks of the relative distance of each replica to the mean
    replica (a collective: call on every rank)."""
    world = dist.get_world_size(group)
    flat = torch.cat([p.detach().flatten().double() for p in module.parameters()])
    mean = flat.clone()
    dist.all_reduce(mean, group=group)
    mean /= world
    rel = torch.linalg.vector_norm(flat - mean) / torch.linalg.vector_norm(mean).clamp_min(1e-30)
    gathered = [torch.zeros_like(rel) for _ in range(world)]
    dist.all_gather(gathered, rel, group=group)
    values = torch.stack(gathered)
    return float(values.max()), float(values.mean())


@torch.no_grad()
def resync_replicas(module: nn.Module, src: int = 0, group: dist.ProcessGroup | None = None) -> None:
    """Broadcast rank ``src``'s parameters and buffers to every rank (bounded drift)."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src, group=group)

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
def resync_replicas(
    module: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    src: int = 0,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Broadcast rank ``src``'s parameters, buffers and (given ``optimizer``) every tensor of
    its per-parameter optimizer state (SGD momentum, Adam moments) to every rank.

    Parameters alone are not enough: with momentum the update is ``lr * m`` and ``m`` keeps
    each replica's own damaged gradients, so replicas would drift apart again at the next
    step even from identical parameters and identical gradients."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src, group=group)
    if optimizer is None:
        return
    for p in module.parameters():
        for name, value in sorted(optimizer.state.get(p, {}).items()):
            # step counters (Adam and the like) are the same on every rank, often CPU scalars
            if torch.is_tensor(value) and name != "step":
                dist.broadcast(value, src=src, group=group)

"""Scenarios of the expert-parallel MoE layer (E = 6 experts over the W ranks, W dividing 6),
run in the lossy group's launch (group_worker.py, W = 3): against the all-local layer with
the same weights on the same tokens, over a plain group, a lossy group at loss 0 and at
loss 0.3 (zero fill). Usage: moe_worker.py OUT.json SCENARIO [...]"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lossy_hooks import LossyState, lossy_group
from lossy_hooks.study.workloads.moe import MoEConfig, MoELayer, route

try:  # run as a script (tests/ on sys.path) or imported from the tests package
    from launch import worker_main
except ImportError:
    from tests.launch import worker_main

D = 16
CFG = MoEConfig(n_expert=6, top_k=2, capacity_factor=1.0)


def layer(group: Any = None) -> MoELayer:
    """The same seed on every rank: the expert-parallel layer is the all-local one, sharded."""
    torch.manual_seed(0)
    moe = MoELayer(D, CFG, proj_std=0.1, ep_group=group).double()
    mine = slice(moe.lo, moe.lo + moe.local)
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 1.0)  # a decided router: uneven splits and drops
        for bias in (moe.b_fc, moe.b_proj):  # every expert's bias drawn, this rank's kept
            bias.copy_(torch.randn(CFG.n_expert, bias.shape[1], dtype=torch.float64)[mine])
    return moe


def data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s tokens (2, 12, D) and the weights of its loss ``sum(w * out)``."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2, 12, D, generator=g, dtype=torch.float64), torch.randn(
        2, 12, D, generator=g, dtype=torch.float64
    )


EXPERT_PARAMS = ("w_fc", "b_fc", "w_proj", "b_proj")


def step(moe: MoELayer, rank: int) -> list[torch.Tensor]:
    """One forward and backward of rank ``rank``'s tokens: output, input grad, router grad,
    then the grads of :data:`EXPERT_PARAMS`."""
    x, w = data(rank)
    x.requires_grad_(True)
    moe.zero_grad()
    out = moe(x)
    (out * w).sum().backward()
    grads = [moe.router.weight.grad, *(getattr(moe, k).grad for k in EXPERT_PARAMS)]
    return [out.detach(), x.grad, *(g.clone() for g in grads)]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def against_reference() -> dict[str, Any]:
    """EP over the world (plain Gloo) vs the all-local layer: output, input and router grads
    of this rank's tokens; expert grads of the owning rank = the reference's summed over every
    rank's tokens (an expert learns from all of them)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ref, ep = layer(), layer(dist.group.WORLD)
    lo, n = ep.lo, ep.local
    mine = slice(lo, lo + n)
    same_init = all(torch.equal(getattr(ep, k), getattr(ref, k)[mine]) for k in EXPERT_PARAMS)
    got = step(ep, rank)
    per_rank = [step(ref, r) for r in range(world)]
    want = per_rank[rank]
    experts = [sum(g[i] for g in per_rank)[mine] for i in (3, 4, 5, 6)]  # EXPERT_PARAMS
    r = route(ref.router(data(rank)[0].reshape(-1, D)), CFG.top_k, CFG.capacity_factor)
    sent = torch.zeros(CFG.n_expert, dtype=torch.int64).index_add_(0, r.expert, r.keep.long())
    return {
        "same_init": same_init,
        "output": close(got[0], want[0]),
        "input_grad": close(got[1], want[1]),
        "router_grad": close(got[2], want[2]),
        "expert_grads": [close(a, b) for a, b in zip(got[3:], experts, strict=True)],
        "splits": sent.view(world, -1).sum(1).tolist(),  # rows this rank dispatches to each rank
        "dropped": int((~r.keep).sum()),
        "max_error": max(float((a - b).abs().max()) for a, b in zip(got[:3], want[:3], strict=True)),
    }


def lossy() -> dict[str, Any]:
    """The same step through lossy groups: loss 0 bitwise the plain group, with its all-to-all
    calls counted; loss 0.3 (zero fill) different, with losses counted."""
    rank = dist.get_rank()
    plain = step(layer(dist.group.WORLD), rank)
    state0 = LossyState(loss_rate=0.0, fill="zero")
    group0 = lossy_group(state0, kinds=("all_to_all",))
    zero = step(layer(group0), rank)
    state3 = LossyState(loss_rate=0.3, fill="zero", mtu=256, seed=5)  # 2 float64 tokens a packet
    group3 = lossy_group(state3, kinds=("all_to_all",))
    lost = step(layer(group3), rank)
    a2a0 = state0.stats()["collectives"]["all_to_all"]
    a2a3 = state3.stats()["collectives"]["all_to_all"]
    return {
        "bitwise": all(torch.equal(a, b) for a, b in zip(plain, zero, strict=True)),
        "calls": a2a0["calls"],
        "lossless_counts": [a2a0["packets_sent"], a2a0["packets_lost"]],
        "lossy_output_differs": not torch.equal(plain[0], lost[0]),
        "lossy_grads_differ": not all(torch.equal(a, b) for a, b in zip(plain[3:], lost[3:], strict=True)),
        "lossy_counts": [a2a3["calls"], a2a3["packets_sent"], a2a3["packets_lost"]],
    }


if __name__ == "__main__":
    worker_main({"reference": against_reference, "lossy": lossy})

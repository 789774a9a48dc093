r"""The per-hop placements' common part: loss per link transmission of the algorithm's
schedule (:mod:`~lossy_hooks.core.placement.schedule`), the real collective still carrying the
result.

The fast path (:class:`~lossy_hooks.core.placement.hop_loss.HopLoss` draws the hops):

* reduce phase: rank ``r`` multiplies its copy of packet ``j`` (chunk ``c``, slot ``i``) by
  ``s_reduce[c, r, i]``, the survival of its contribution along its path to ``c``'s root,
  before the backend's allreduce, whose sum is then exactly the root's partial sum;
  ``fill="rescale"`` scales by ``W / c_j``, ``c_j = sum_r s_reduce[c, r, i]`` the count of
  contributions, known on every rank (a header would carry it; the root's own is never lost,
  so ``c_j >= 1``);
* broadcast phase: rank ``r`` misses packet ``j`` of the result where
  ``s_broadcast[c, r, i] = 0``: ``zero`` sets it to 0, ``rescale`` divides a received one by
  ``q[c, r]``, the product of its path's link keep probabilities (the owner ``1``; on a ring
  ``(1 - p)^k`` at ``k`` hops downstream), ``stale`` keeps the last value received.

``drop_point`` selects the phases that lose (``worker``: reduce, ``post``: broadcast). Every
directed link has its own loss model (its memory: bursts are per link) and all ranks draw the
same hops from one stream per phase, shared by the ranks (``(seed, phase)``), so every rank
knows what every hop lost without communicating.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist

from lossy_hooks.core.placement.base import LossSite, Phase, Placement
from lossy_hooks.core.placement.schedule import Chunking, PhaseShape, path_products
from lossy_hooks.core.placement.timing import PhaseTiming

if TYPE_CHECKING:
    from lossy_hooks.core.network import NetworkModel
    from lossy_hooks.core.options import LossConfig

__all__ = ["HopPlacement"]


class HopPlacement(Placement):
    """A placement that loses per hop of its algorithm's schedule (see the module).
    Subclasses give the chunks (:meth:`chunk_count`) and each phase's trees
    (:meth:`trees`)."""

    per_hop = True
    shards: ClassVar[bool] = False  # FSDP's reduce-scatter / all-gather run on it (one chunk per rank)
    SITES = (LossSite("worker", "reduce", None), LossSite("post", "broadcast", None))
    # the phase each tree direction belongs to: reduce links run towards the root
    TOWARDS_ROOT: ClassVar[dict[Phase, bool]] = {"reduce": True, "broadcast": False}

    def __init__(self) -> None:
        self._shapes: dict[int, dict[Phase, PhaseShape]] = {}

    def all_sites(self) -> tuple[LossSite, ...]:
        return self.SITES

    @abstractmethod
    def chunk_count(self, world: int) -> int:
        """``C``: how many chunks a bucket is split into at ``world`` ranks."""

    @abstractmethod
    def trees(self, world: int) -> dict[Phase, tuple[np.ndarray, np.ndarray]]:
        """Per phase, ``(parent, order)``: ``(C, W)`` int arrays (see the schedule module)."""

    def shapes(self, world: int) -> dict[Phase, PhaseShape]:
        """Both phases' :class:`PhaseShape` at ``world`` ranks (built once per world size)."""
        if world not in self._shapes:
            self._shapes[world] = {
                phase: PhaseShape.build(parent, order, self.TOWARDS_ROOT[phase])
                for phase, (parent, order) in self.trees(world).items()
            }
        return self._shapes[world]

    def expected_delivered(self, world: int, loss_rate: float, phase: Phase) -> float:
        """``mean_{c, r} (1 - p)^{hops(c, r)}``, the hops of ``r``'s path in the schedule
        (exact for every algorithm here; on a ring ``(1 - (1-p)^W) / (W p)``, a direct
        exchange ``1 - p (W - 1) / W``, a tree the mean of ``(1-p)^depth``)."""
        shape = self.shapes(world)[phase]
        edge = torch.full(shape.parent.shape, 1.0 - loss_rate, dtype=torch.float64)
        edge[shape.parent == torch.arange(world)] = 1.0
        return float(path_products(edge, shape.parent, shape.depth).mean())

    def refuses(self, config: LossConfig) -> str | None:
        why = {
            "post_sync": (
                config.post_sync != "shared",
                "the algorithm decides which ranks miss a result packet",
            ),
            "counts_transport": (
                config.counts_transport not in ("auto", "regenerate"),
                "every rank replays every hop, so the arrival counts are known without a transport",
            ),
            "fec": (config.fec is not None, "an FEC group per link is not modelled yet"),
            "retransmit": (config.retransmit > 0, "a per-hop resend is not modelled yet"),
            "protect": (config.protect is not None, "protected packets per hop are not modelled yet"),
        }
        for name, (refused, reason) in why.items():
            if refused:
                return f"algorithm={self.name!r} does not take {name}={getattr(config, name)!r}: {reason}"
        return None

    def timing(
        self,
        network: NetworkModel,
        world: int,
        packets: int,
        nbytes: float,
        device: torch.device | None = None,
    ) -> dict[Phase, PhaseTiming]:
        """Both phases' price for a bucket of ``nbytes`` bytes in ``packets`` packets
        (:class:`~lossy_hooks.core.placement.timing.PhaseTiming`: the store-and-forward rule)."""
        chunking = Chunking.of(packets, self.chunk_count(world))
        b = nbytes / max(packets, 1)
        return {p: PhaseTiming.of(s, chunking, b, network, device) for p, s in self.shapes(world).items()}

    def fsdp_refuses(self, config: LossConfig, collective: str) -> str | None:
        """FSDP runs its reduce-scatter and all-gather as rings under NCCL: per hop, a ring
        or a direct exchange (:attr:`shards`); the reduce-scatter is the reduce phase only
        (it ends at the shard's owner), the all-gather the broadcast phase only."""
        if not self.shards:
            return (
                f"algorithm={self.name!r} has no sharded form (NCCL runs FSDP's reduce-scatter and "
                "all-gather as rings): use algorithm='ring' or 'direct'"
            )
        if collective == "reduce-scatter" and config.drop_point != "worker":
            return (
                f"a {self.name} reduce-scatter ends at each shard's owner: it has only the reduce "
                f"phase, so drop_point must be 'worker', not {config.drop_point!r}"
            )
        return None

    def lossfree_seconds(
        self, network: NetworkModel, nbytes: float, world: int, packets: int | None = None
    ) -> float:
        """``T_0 = sum`` over both phases of ``sum_t tau0_t`` (the timing module)."""
        if world <= 1:
            return 0.0
        if packets is None:
            raise ValueError(f"algorithm={self.name!r} prices a bucket by its packets: give packets=")
        return sum(t.lossfree for t in self.timing(network, world, packets, nbytes).values())

    # the real collective carries the result; the hops' losses are the masks around it
    def all_reduce(self, tensor: torch.Tensor, group: Any) -> torch.futures.Future:
        return dist.all_reduce(tensor, group=group, async_op=True).get_future()

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: Any, group: Any) -> None:
        if not self.shards:
            raise NotImplementedError(f"algorithm={self.name!r} has no sharded form (fsdp_refuses)")
        dist.reduce_scatter_single(output=output, input=input, op=op, group=group)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, group: Any) -> None:
        if not self.shards:
            raise NotImplementedError(f"algorithm={self.name!r} has no sharded form (fsdp_refuses)")
        dist.all_gather_single(output, input, group=group)

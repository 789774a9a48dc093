"""The placement seam: where a collective can lose packets, how it runs, what it costs.

A placement answers two questions for one collective over ``W`` ranks:

* **where** packets can be lost: its loss *sites*, each a phase of the collective
  (``reduce``: contributions travelling towards the sum; ``broadcast``: the result travelling
  back) crossed in a number of hops; a drop point (``worker``, ``post``, ``both``) selects
  the sites of its phases;
* **how the collective runs**: it launches the lossy collective itself (:meth:`Placement.all_reduce`
  for a DDP bucket, :meth:`Placement.reduce_scatter` / :meth:`Placement.all_gather` for FSDP's
  shards), so a placement that loses packets inside the collective (per hop of a ring) owns
  the whole exchange; the collectives that must arrive whole (arrival counts, the lossless
  reference of ``measure_fidelity``) stay plain ``torch.distributed`` calls;
* **what it costs**: the loss-free time of the collective on a
  :class:`~lossy_hooks.core.network.NetworkModel`, which the simulated clock
  (:class:`~lossy_hooks.core.netclock.SimClock`) and the deadline loss model take as ``T_0``.

:class:`ParameterServer` is today's placement: every rank's contribution crosses one uplink
before the sum (site ``worker``, the reduce phase) and the result one downlink after it (site
``post``, the broadcast phase), the real collective in between opaque to the loss; it is
priced as the α–β ring allreduce ``T_0 = 2 (W - 1) (α + B / (W β))``
(:meth:`NetworkModel.ring_seconds`). A placement that loses per hop of a ring, a tree or a
direct exchange is a :class:`~lossy_hooks.core.placement.hops.HopPlacement`
(``ring.py``, ``tree.py``, ``direct.py``), all registered in
:data:`~lossy_hooks.core.placement.PLACEMENTS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

if TYPE_CHECKING:
    from lossy_hooks.core.network import NetworkModel
    from lossy_hooks.core.options import LossConfig

Phase = Literal["reduce", "broadcast"]

# which phases a drop point loses in
PHASES_OF_DROP_POINT: dict[str, tuple[Phase, ...]] = {
    "worker": ("reduce",),
    "post": ("broadcast",),
    "both": ("reduce", "broadcast"),
}


@dataclass(frozen=True)
class LossSite:
    """One place where a collective can lose packets: ``name`` (the ledger's drop point),
    its ``phase``, and the ``hops`` a packet makes through it (``None``: as many as the
    algorithm's schedule makes at the world size, e.g. ``W - 1`` on a ring)."""

    name: str
    phase: Phase
    hops: int | None


class Placement(ABC):
    """Where a collective loses packets and what it costs loss-free (see the module)."""

    name: ClassVar[str]
    per_hop: ClassVar[bool] = False  # loses per link transmission (HopPlacement)

    @abstractmethod
    def all_sites(self) -> tuple[LossSite, ...]:
        """Every loss site of the collective, reduce phase first."""

    @abstractmethod
    def lossfree_seconds(
        self, network: NetworkModel, nbytes: float, world: int, packets: int | None = None
    ) -> float:
        """``T_0``: the loss-free time of one collective of ``nbytes`` bytes (in ``packets``
        packets, where the placement prices packets) over ``world`` ranks on ``network``."""

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor, group: Any) -> torch.futures.Future:
        """Launch the sum of ``tensor`` over ``group`` in place, asynchronously (the DDP
        hook's bucket: called in the hook body, never from a callback)."""

    @abstractmethod
    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: Any, group: Any) -> None:
        """FSDP's gradient reduce-scatter: ``output`` <- row ``rank`` of ``op`` over the
        ranks' ``input`` rows, on the calling stream."""

    @abstractmethod
    def all_gather(self, output: torch.Tensor, input: torch.Tensor, group: Any) -> None:
        """FSDP's parameter all-gather: row ``j`` of ``output`` <- rank ``j``'s ``input``."""

    @abstractmethod
    def expected_delivered(self, world: int, loss_rate: float, phase: Phase) -> float:
        """The closed form: the mean fraction of contributions that reach the sum
        (``reduce``) or of result packets that reach a rank (``broadcast``) under i.i.d.
        loss ``p`` on every lossy hop, zero fill, chunks of equal size."""

    def refuses(self, config: LossConfig) -> str | None:
        """Why ``config`` (which uses this placement) has no meaning here, or ``None``."""
        return None

    def fsdp_refuses(self, config: LossConfig, collective: str) -> str | None:
        """Why FSDP's ``collective`` (``"reduce-scatter"``, ``"all-gather"``) cannot run
        ``config`` on this placement, or ``None``."""
        return None

    def sites(self, drop_point: str) -> tuple[LossSite, ...]:
        """The sites ``drop_point`` loses at: those of its phases (:data:`PHASES_OF_DROP_POINT`)."""
        phases = PHASES_OF_DROP_POINT[drop_point]
        return tuple(s for s in self.all_sites() if s.phase in phases)

    def loses(self, drop_point: str, phase: Phase) -> bool:
        """Whether ``drop_point`` loses packets in ``phase``."""
        return any(s.phase == phase for s in self.sites(drop_point))

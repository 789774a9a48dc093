r"""The packet pipeline of what travels from one rank to another and is not reduced: the
lossy process group's all-to-all, broadcast, point-to-point messages and all-gather.

A received buffer is a sequence of *chunks*, each from one sender (an all-to-all: one chunk
per sender, of its split's size; an all-gather: one row per rank; a broadcast or a message:
one chunk from the root or the peer). Each chunk is split into MTU packets of its own (a
packet never crosses a chunk: ``n_c = ceil(m_c / k)`` packets of ``k = mtu // itemsize``
elements, the last one shorter). The real collective carries the values; then, at the
receiver ``r``, every packet of a chunk from another rank is lost with the state's loss
model, drawn from the receiver's own stream of that kind (``Stream.DELIVERY_*``, seeded
``(seed, stream, r)``: receivers lose independently, and one kind's traffic never shifts
another's losses). A rank's own chunk never crosses the network and is never lost. With
``ranks_per_node = G`` a chunk from a rank of the same node (``s // G == r // G``) is never
lost either.

What a lost packet becomes (the state's fill, :meth:`Fill.fill_received_`'s rules):

- ``"zero"``: its elements are 0 (for a dispatched token: its expert output is missing and
  the residual passes);
- ``"stale"``: the last value received at the same place of a buffer of the same kind,
  senders and chunk sizes (a message: from that peer, with that tag and shape), 0 before the
  first; the stale copy takes every received packet whose elements are all finite (the
  fills' own rule, :func:`~lossy_hooks.core.techniques.fills.stale_fill_`).

Each chunk from another rank is filled in one pass over views of its own
:class:`~lossy_hooks.core.packetization.PacketLayout` (a loop over senders, not packets; the
own chunk is never touched), even or uneven (a mixture of experts' dispatch) alike.

``rescale`` has no meaning here (nothing is summed: no copy to average) and is refused by the
group before any collective runs. Counted per kind: packets that crossed the network to this
rank, and those lost.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lossy_hooks.core.packetization import PacketLayout, elements_per_packet
from lossy_hooks.core.streams import DropSite, Stream

if TYPE_CHECKING:
    from lossy_hooks.core.ledger import PacketLedger
    from lossy_hooks.core.options import LossConfig

__all__ = ["DELIVERY_KINDS", "Chunk", "Delivery"]

# the kinds delivered (not reduced), and the stream each one draws its losses from
DELIVERY_KINDS: dict[str, Stream] = {
    "all_gather": Stream.DELIVERY_ALL_GATHER,
    "all_to_all": Stream.DELIVERY_ALL_TO_ALL,
    "broadcast": Stream.DELIVERY_BROADCAST,
    "p2p": Stream.DELIVERY_P2P,
}

Chunk = tuple[int, int]  # (sender rank in the group, elements), in buffer order


class Delivery:
    """The delivery kinds of one :class:`~lossy_hooks.LossyState`: their streams (one
    :class:`~lossy_hooks.core.streams.DropSite` per kind, per receiving rank), the stale
    copies, and their checkpoint state. It reads the state's settings (loss model, seed,
    MTU, nodes, fill) and counts in its ledger, nothing else."""

    def __init__(self, settings: LossConfig, ledger: PacketLedger) -> None:
        self.settings, self.ledger = settings, ledger
        model = settings.loss_model
        self.sites = {
            kind: DropSite(kind, model.clone(), stream, per_rank=True)
            for kind, stream in DELIVERY_KINDS.items()
        }
        self.stale: dict[str, torch.Tensor] = {}
        self.restored = False

    @torch.no_grad()
    def receive_(self, kind: str, out: torch.Tensor, chunks: Sequence[Chunk], key: str, rank: int) -> None:
        """``out`` (contiguous) as received at ``rank``, its chunks from ``chunks`` in order:
        each packet from another rank lost at this receiver, filled by the state's fill
        (:meth:`~lossy_hooks.core.techniques.fills.Fill.fill_received_`), counted (see the
        module). ``key`` names the buffer's place for the stale fill. Outside autograd: a
        receive buffer may be a leaf that requires grad (torch.distributed.pipelining's
        activations), which the network writes, not the model."""
        settings = self.settings
        site = self.sites[kind]
        site.prepare(out.device, settings.seed, rank)
        flat, itemsize = out.view(-1), out.element_size()
        k = elements_per_packet(settings.mtu, itemsize)
        sizes = [m for _, m in chunks]
        counts = [-(-m // k) for m in sizes]
        node = settings.ranks_per_node
        remote = [
            i
            for i, (sender, m) in enumerate(chunks)
            if m and sender != rank and (node is None or sender // node != rank // node)
        ]
        network = sum(counts[i] for i in remote)
        drawn = site.draw(network)  # one draw for every packet that crosses the network
        self.ledger.count_collective(kind, network, sum(sizes[i] for i in remote) * itemsize, drawn)
        if drawn is None or not remote:
            return
        fill = settings.fill_technique
        stale = self._stale(key, flat) if fill.keeps_stale else None
        starts = [0, *itertools.accumulate(sizes)]
        first = 0
        for i in remote:  # one pass per chunk from another rank (the own chunk never touched)
            part = slice(starts[i], starts[i + 1])
            layout = PacketLayout.by_mtu(sizes[i], settings.mtu, itemsize)
            lost = drawn[first : first + counts[i]]
            fill.fill_received_(layout, flat[part], lost, None if stale is None else stale[part])
            first += counts[i]

    def _stale(self, key: str, like: torch.Tensor) -> torch.Tensor:
        stale = self.stale.get(key)
        if stale is None or stale.shape != like.shape or stale.dtype != like.dtype:
            stale = self.stale[key] = torch.zeros_like(like)
        elif stale.device != like.device:  # restored from a checkpoint (CPU)
            stale = self.stale[key] = stale.to(like.device)
        return stale

    @property
    def used(self) -> bool:
        """Whether any delivery was received (or restored from a checkpoint)."""
        return bool(self.stale) or any(s.generator is not None for s in self.sites.values()) or self.restored

    def state_dict(self) -> dict[str, Any]:
        """Each kind's stream and the stale copies (CPU tensors)."""
        return {
            "sites": {kind: site.state_dict() for kind, site in self.sites.items()},
            "stale": {k: v.detach().cpu() for k, v in self.stale.items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for kind, site_sd in sd.get("sites", {}).items():
            self.sites[kind].load_state_dict(site_sd)
        self.stale = {k: v.clone() for k, v in sd.get("stale", {}).items()}
        self.restored = True

r"""What the hook writes: the packet counters of one :class:`~lossy_hooks.LossyState`, per
bucket key and drop point, on the buckets' device (one ``add_`` per bucket, no host sync),
and their checkpoint state. :class:`~lossy_hooks.core.ledger.PacketLedger` adds the reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["BucketEntry", "BucketKey", "PacketCounters", "key_from_str", "key_str"]

# (bucket index, numel, generation): one key per distinct content of a bucket. DDP rebuilds
# its buckets after the first iteration; a rebuilt bucket may keep its index and size but hold
# other parameters (or the same ones in another order): it gets the next generation.
BucketKey = tuple[int, int, int]


def key_str(key: BucketKey) -> str:
    return ":".join(map(str, key))


def key_from_str(text: str) -> BucketKey:
    parts = [int(x) for x in text.split(":")]
    return parts[0], parts[1], parts[2] if len(parts) > 2 else 0  # "index:numel" before version 2


@dataclass
class BucketEntry:
    """What the ledger knows of one bucket key: its packet count and parameter sizes (kept
    across resumes), and, once seen in this process, its parameters' ``id()``, the elements
    per packet (``None``: one packet per parameter), its bytes on the wire and the blocks over
    which an encoding spreads a packet's loss."""

    packets: int
    sizes: tuple[int, ...]
    param_ids: tuple[int, ...] | None = None
    packet_numel: int | None = None
    wire_bytes: int = 0  # bytes of one call's packets on the wire (wire dtype, padding included)
    blocks: tuple[int, ...] = ()  # an encoding's block edges (hadamard.block_edges); () without one
    label: str | None = None  # what the bucket holds when it is not a list of parameters (FSDP)


class PacketCounters:
    """The counters (see the module); :class:`~lossy_hooks.core.ledger.PacketLedger` reads them.

    Args:
        points: the active drop points, among ``("worker", "post")``.
        track_unrecovered: count packets no rank's copy reached (worker drop with rescale).
        track_protection: report FEC / retransmission / protection counters in ``stats``.
        process_group: the group ``all_ranks=True`` sums over (default: the world).
    """

    def __init__(
        self,
        points: tuple[str, ...],
        track_unrecovered: bool,
        process_group: Any = None,
        track_protection: bool = False,
    ) -> None:
        self.points = points
        self.track_unrecovered = track_unrecovered
        self.track_protection = track_protection
        self.process_group = process_group
        self.device: torch.device | None = None
        self.buckets: dict[BucketKey, BucketEntry] = {}
        self.sent: dict[str, dict[BucketKey, int]] = {p: {} for p in points}
        self.lost: dict[str, dict[BucketKey, torch.Tensor]] = {p: {} for p in points}  # per packet
        self.unrecovered: dict[BucketKey, torch.Tensor] = {}
        self.protection: dict[str, dict[BucketKey, torch.Tensor]] = {p: {} for p in points}
        self.mark: dict[str, list[int]] = {}
        self.pending_fidelity: dict[int, list[torch.Tensor]] = {}
        # a per-hop placement's links, per phase: names, packets carried (host), lost (device)
        self.links: dict[str, tuple[str, ...]] = {}
        self.link_carried: dict[str, np.ndarray] = {}
        self.link_lost: dict[str, torch.Tensor] = {}
        # the lossy process group's collectives, per kind: calls, packets, bytes (host) and
        # packets lost (an int64 scalar on the device)
        self.collectives: dict[str, list[int]] = {}
        self.collective_lost: dict[str, torch.Tensor] = {}

    # -- called by the hook (device work only) --------------------------------------------

    def to(self, device: torch.device) -> None:
        """Keep the counters on ``device`` (the buckets')."""
        self.device = device
        stores = (*self.lost.values(), *self.protection.values(), self.unrecovered, self.link_lost)
        for d in (*stores, self.collective_lost):
            for k, v in d.items():
                d[k] = v.to(device)

    def register(self, key: BucketKey, entry: BucketEntry) -> None:
        self.buckets[key] = entry

    def count(self, point: str, key: BucketKey, num_packets: int, lost: torch.Tensor | None) -> None:
        """``num_packets`` sent at ``point``; ``lost`` the loss mask (``None``: none lost), or
        ``(rows, n)`` masks of rows of the same ``n`` packets (FSDP shards: counted per packet
        position, summed over the rows)."""
        self.sent[point][key] = self.sent[point].get(key, 0) + num_packets
        if lost is None:
            return
        per_packet = self.lost[point].get(key)
        if per_packet is None:
            per_packet = self.lost[point][key] = torch.zeros(
                lost.shape[-1], dtype=torch.int32, device=lost.device
            )
        per_packet.add_(lost.sum(0, dtype=torch.int32) if lost.dim() > 1 else lost)

    def count_links(
        self, phase: str, links: tuple[tuple[int, int], ...], carried: np.ndarray, lost: torch.Tensor
    ) -> None:
        """One collective of a per-hop placement in ``phase``: packets each link carried
        (known on the host from the schedule) and lost (int64, on the device). The same on
        every rank (every rank replays every hop)."""
        if phase not in self.links:
            self.links[phase] = tuple(f"{a}->{b}" for a, b in links)
            self.link_carried[phase] = np.zeros(len(links), dtype=np.int64)
            self.link_lost[phase] = torch.zeros(len(links), dtype=torch.int64, device=lost.device)
        self.link_carried[phase] += carried
        self.link_lost[phase].add_(lost)

    def count_collective(self, kind: str, packets: int, nbytes: int, lost: torch.Tensor | None) -> None:
        """One call of the lossy process group's ``kind``: ``packets`` packets of ``nbytes``
        bytes put at risk for this rank, ``lost`` their loss mask(s) (``None``: none lost)."""
        row = self.collectives.setdefault(kind, [0, 0, 0])
        row[0] += 1
        row[1] += packets
        row[2] += nbytes
        if lost is None:
            return
        total = self.collective_lost.get(kind)
        if total is None:
            total = self.collective_lost[kind] = torch.zeros((), dtype=torch.int64, device=lost.device)
        total.add_(lost.sum())

    def count_protection(self, point: str, key: BucketKey, counters: torch.Tensor) -> None:
        """Add one call's :data:`~lossy_hooks.core.techniques.protection.COUNTERS` (int64, on the device)."""
        total = self.protection[point].get(key)
        if total is None:
            self.protection[point][key] = counters.clone()
        else:
            total.add_(counters)

    def unrecovered_counter(self, key: BucketKey, device: torch.device) -> torch.Tensor:
        counter = self.unrecovered.get(key)
        if counter is None:
            counter = self.unrecovered[key] = torch.zeros((), dtype=torch.long, device=device)
        return counter

    def fidelity_slot(self, step: int, device: torch.device) -> torch.Tensor:
        """A 4-vector the hook's callback fills with one bucket's fidelity sums for ``step``."""
        slot = torch.zeros(4, dtype=torch.float64, device=device)
        self.pending_fidelity.setdefault(step, []).append(slot)
        return slot

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters (CPU tensors), bucket registry, mark; ``torch.load(weights_only=True)`` safe."""
        return (
            {
                "buckets": {
                    key_str(k): {"packets": e.packets, "sizes": list(e.sizes), "wire_bytes": e.wire_bytes}
                    | ({"label": e.label} if e.label else {})
                    for k, e in self.buckets.items()
                },
                "sent": {p: {key_str(k): n for k, n in d.items()} for p, d in self.sent.items()},
                "lost": {
                    p: {key_str(k): v.detach().cpu() for k, v in d.items()} for p, d in self.lost.items()
                },
                "unrecovered": {key_str(k): v.detach().cpu() for k, v in self.unrecovered.items()},
                "protection": {
                    p: {key_str(k): v.detach().cpu() for k, v in d.items()}
                    for p, d in self.protection.items()
                },
                "mark": {k: list(v) for k, v in self.mark.items()},
            }
            | (
                {
                    "collectives": {
                        kind: {"calls": row[0], "packets": row[1], "bytes": row[2]}
                        | (
                            {"lost": self.collective_lost[kind].detach().cpu()}
                            if kind in self.collective_lost
                            else {}
                        )
                        for kind, row in self.collectives.items()
                    }
                }
                if self.collectives
                else {}
            )
            | (
                {
                    "links": {
                        phase: {
                            "names": list(names),
                            "carried": torch.from_numpy(self.link_carried[phase].copy()),
                            "lost": self.link_lost[phase].detach().cpu(),
                        }
                        for phase, names in self.links.items()
                    }
                }
                if self.links
                else {}
            )
        )

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.buckets = {
            key_from_str(k): BucketEntry(
                int(e["packets"]),
                tuple(int(x) for x in e["sizes"]),
                wire_bytes=int(e.get("wire_bytes", 0)),
                label=e.get("label"),
            )
            for k, e in sd["buckets"].items()
        }
        self.sent = {
            p: {key_from_str(k): int(n) for k, n in sd["sent"].get(p, {}).items()} for p in self.points
        }
        self.lost = {
            p: {key_from_str(k): v.clone() for k, v in sd["lost"].get(p, {}).items()} for p in self.points
        }
        self.unrecovered = {key_from_str(k): v.clone() for k, v in sd["unrecovered"].items()}
        saved = sd.get("protection", {})
        self.protection = {
            p: {key_from_str(k): v.clone() for k, v in saved.get(p, {}).items()} for p in self.points
        }
        self.mark = {k: [int(x) for x in v] for k, v in sd.get("mark", {}).items()}
        links = sd.get("links", {})
        self.links = {phase: tuple(v["names"]) for phase, v in links.items()}
        self.link_carried = {phase: v["carried"].numpy().astype(np.int64) for phase, v in links.items()}
        self.link_lost = {phase: v["lost"].clone() for phase, v in links.items()}
        kinds = sd.get("collectives", {})
        self.collectives = {
            k: [int(v["calls"]), int(v["packets"]), int(v["bytes"])] for k, v in kinds.items()
        }
        self.collective_lost = {k: v["lost"].clone() for k, v in kinds.items() if "lost" in v}
        self.pending_fidelity = {}
        self.device = None

    @staticmethod
    def from_version_2(sd: dict[str, Any]) -> dict[str, Any]:
        """A version-2 ``LossyState.state_dict`` (counters kept per drop site) as a ledger state."""
        sizes = sd.get("sizes", {})
        return {
            "buckets": {
                k: {"packets": n, "sizes": sizes.get(k, [])} for k, n in sd.get("packets", {}).items()
            },
            "sent": {p: dict(sd[p]["sent"]) for p in ("worker", "post")},
            "lost": {p: dict(sd[p].get("lost_per_packet", {})) for p in ("worker", "post")},
            "unrecovered": dict(sd["worker"]["unrecovered"]),
        }

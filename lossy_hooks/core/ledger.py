r"""The packet ledger: everything the lossy hook counts, apart from how it drops.

The hook tells the ledger, per bucket and drop point, how many packets it sent and which
were lost (a per-packet count on the bucket's device: one ``add_`` per bucket, no host
sync); the ledger answers the questions a study asks, reading its device counters only
when asked (one host sync, and one collective with ``all_ranks=True``):

- :meth:`PacketLedger.stats`: packets sent, lost and unrecovered per drop point and bucket;
- :meth:`PacketLedger.loss_by_parameter`: the same per parameter gradient;
- :meth:`PacketLedger.fidelity`: cosine and relative L2 of the lossy aggregate per step;
- :meth:`PacketLedger.since_mark`: what happened since the last mark (an epoch), as the
  rows a study writes, so a script never keeps its own copies of cumulative counters.

Its :meth:`~PacketLedger.state_dict` carries the counters, the bucket registry and the mark,
so a resumed run continues every figure where the checkpoint left it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lossy_hooks.core.techniques.hadamard import carrying_packets
from lossy_hooks.core.techniques.protection import COUNTERS

__all__ = ["BucketEntry", "BucketKey", "PacketLedger", "collective_device"]

# (bucket index, numel, generation): one key per distinct content of a bucket. DDP rebuilds
# its buckets after the first iteration; a rebuilt bucket may keep its index and size but hold
# other parameters (or the same ones in another order): it gets the next generation.
BucketKey = tuple[int, int, int]


def key_str(key: BucketKey) -> str:
    return ":".join(map(str, key))


def key_from_str(text: str) -> BucketKey:
    parts = [int(x) for x in text.split(":")]
    return parts[0], parts[1], parts[2] if len(parts) > 2 else 0  # "index:numel" before version 2


def collective_device(group: Any = None) -> torch.device:
    """The device a collective over ``group`` needs its tensors on: the current CUDA device
    for NCCL, else the CPU (Gloo, MPI)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    blocks: tuple[int, ...] = ()  # an encoding's block edges (encoding.block_edges); () without one
    label: str | None = None  # what the bucket holds when it is not a list of parameters (FSDP)


class PacketLedger:
    """Counters of one :class:`~lossy_hooks.LossyState`.

    Args:
        points: the active drop points, among ``("worker", "post")``.
        track_unrecovered: count packets no rank's copy reached (worker drop with rescale).
        track_protection: report FEC / retransmission / protection counters in :meth:`stats`.
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
        self._fidelity: dict[int, list[torch.Tensor]] = {}

    # -- called by the hook (device work only) --------------------------------------------

    def to(self, device: torch.device) -> None:
        """Keep the counters on ``device`` (the buckets')."""
        self.device = device
        for d in (*self.lost.values(), *self.protection.values(), self.unrecovered):
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
        self._fidelity.setdefault(step, []).append(slot)
        return slot

    # -- read when asked --------------------------------------------------------------------

    def _collective_device(self) -> torch.device:
        """The buckets' device once one was seen; before that the group backend's."""
        if self.device is not None:
            return self.device
        if dist.is_available() and dist.is_initialized():
            return collective_device(self.process_group)
        return torch.device("cpu")

    def _sum_over_ranks(self, vec: torch.Tensor) -> None:
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        dist.all_reduce(vec, group=group)

    def stats(self, all_ranks: bool = False) -> dict[str, Any]:
        """Per drop point: ``packets_sent``, ``packets_lost`` (lost after every recovery
        mechanism), ``loss_rate``, ``bytes_sent`` (the wire dtype's bytes, encoding padding
        included), ``packets_unrecovered`` when tracked, and with FEC, retransmission or
        protection ``extra_packets`` / ``extra_bytes`` (parity and resent packets, at the
        bucket's mean packet size), ``recovered_fec``, ``recovered_retransmit``,
        ``recovered_protect`` and ``protected_packets``. Per bucket (``buckets``): index,
        numel, generation, packets, ``<point>_sent``, ``<point>_lost``. With
        ``all_ranks=True`` summed over the group (a collective: every rank calls it)."""
        keys = sorted({k for p in self.points for k in self.sent[p]})
        device = self._collective_device()
        width = 3 + len(COUNTERS)
        zeros = torch.zeros(len(COUNTERS), dtype=torch.int64, device=device)
        rows: list[torch.Tensor] = []
        for p in self.points:
            for k in keys:
                lost = self.lost[p].get(k)
                unrec = self.unrecovered.get(k) if p == "worker" else None
                head = [
                    torch.tensor(self.sent[p].get(k, 0), dtype=torch.int64, device=device),
                    lost.sum().to(device) if lost is not None else zeros[0],
                    unrec.to(device) if unrec is not None else zeros[0],
                ]
                prot = self.protection[p].get(k)
                rows.append(torch.cat((torch.stack(head), prot.to(device) if prot is not None else zeros)))
        vec = (
            torch.stack(rows).double()
            if rows
            else torch.zeros((0, width), dtype=torch.float64, device=device)
        )
        if all_ranks:
            self._sum_over_ranks(vec)
        values = [[round(v) for v in row] for row in vec.tolist()]
        buckets = {
            k: {"index": k[0], "numel": k[1], "generation": k[2], "packets": self._entry(k).packets}
            for k in keys
        }
        out: dict[str, Any] = {}
        it = iter(values)
        for p in self.points:
            total = [0] * width
            sent_bytes = extra_bytes = 0
            for k in keys:
                row = next(it)
                total = [a + b for a, b in zip(total, row, strict=True)]
                buckets[k].update({f"{p}_sent": row[0], f"{p}_lost": row[1]})
                entry = self._entry(k)
                if entry.packets:
                    sent_bytes += row[0] * entry.wire_bytes // entry.packets
                    extra_bytes += round(row[3] * entry.wire_bytes / entry.packets)
            sent, lost = total[0], total[1]
            entry_out: dict[str, Any] = {"packets_sent": sent, "packets_lost": lost}
            entry_out["loss_rate"] = lost / sent if sent else 0.0
            entry_out["bytes_sent"] = sent_bytes
            if p == "worker" and self.track_unrecovered:
                entry_out["packets_unrecovered"] = total[2]
            if self.track_protection:
                entry_out |= dict(zip(COUNTERS, total[3:], strict=True)) | {"extra_bytes": extra_bytes}
            out[p] = entry_out
        out["buckets"] = list(buckets.values())
        return out

    def _entry(self, key: BucketKey) -> BucketEntry:
        return self.buckets.get(key) or BucketEntry(0, ())

    def loss_by_parameter(self, names: dict[int, str], all_ranks: bool = False) -> list[dict[str, Any]]:
        """Packets sent and lost for each parameter's gradient, per drop point.

        ``names`` maps ``id(parameter)`` to its name. A parameter occupying elements
        ``[s, e)`` of a bucket with ``k`` elements per packet is carried by packets ``s // k``
        to ``(e - 1) // k``; a packet straddling two parameters counts for both. Summed over
        the buckets a parameter has been in this process (DDP's first-iteration bucket
        included). ``all_ranks=True`` sums over the group (a collective)."""
        keys = sorted(k for k, e in self.buckets.items() if e.param_ids is not None)
        device = self._collective_device()
        parts = []
        for p in self.points:
            for k in keys:
                per_packet = self.lost[p].get(k)
                n = self.buckets[k].packets
                parts.append(
                    torch.zeros(n, dtype=torch.int64, device=device)
                    if per_packet is None
                    else per_packet.to(device, torch.int64)
                )
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)
        world = 1
        if all_ranks:
            if flat.numel():
                self._sum_over_ranks(flat)
            world = dist.get_world_size(self.process_group)
        counts = flat.cpu().numpy()
        totals: dict[tuple[str, str], dict[str, Any]] = {}
        offset = 0
        for p in self.points:
            for k in keys:
                entry = self.buckets[k]
                cum = np.concatenate([[0], np.cumsum(counts[offset : offset + entry.packets])])
                offset += entry.packets
                calls = self.sent[p].get(k, 0) // max(entry.packets, 1) * world
                start = 0
                for j, (pid, size) in enumerate(zip(entry.param_ids or (), entry.sizes, strict=True)):
                    if entry.packet_numel is None:
                        first = last = j
                    else:  # with an encoding, every packet of the blocks the parameter is in
                        first, last = carrying_packets(
                            start, start + size, entry.packet_numel, entry.packets, entry.blocks
                        )
                    start += size
                    label = names.get(pid, f"param@{pid}")
                    row = totals.setdefault(
                        (p, label),
                        {
                            "drop_point": p,
                            "parameter": label,
                            "elements": size,
                            "packets_sent": 0,
                            "packets_lost": 0,
                        },
                    )
                    row["packets_sent"] += (last - first + 1) * calls
                    row["packets_lost"] += int(cum[last + 1] - cum[first])
        out = list(totals.values())
        for row in out:
            row["loss_rate"] = row["packets_lost"] / row["packets_sent"] if row["packets_sent"] else 0.0
        return out

    def fidelity(self, steps_done: int) -> list[dict[str, float]]:
        """Per finished step (``< steps_done``) since the last call: cosine similarity and
        relative L2 error of the lossy aggregate against the lossless one.

        Over all buckets of a step, with ``x`` lossy and ``y`` lossless:
        ``cos = <x, y> / (|x| |y|)`` (1 when both are 0), ``rel_l2 = |x - y| / |y|`` (0 when equal).
        """
        out = []
        for step in sorted(s for s in self._fidelity if s < steps_done):
            dot, xx, yy, dd = torch.stack(self._fidelity.pop(step)).sum(0).tolist()
            cos = 1.0 if xx == 0 and yy == 0 else dot / math.sqrt(xx * yy) if xx * yy > 0 else 0.0
            rel = 0.0 if dd == 0 else (math.sqrt(dd / yy) if yy > 0 else math.inf)
            out.append({"step": step, "cosine": cos, "rel_l2": rel})
        return out

    def since_mark(self, names: dict[int, str], all_ranks: bool = True) -> dict[str, Any]:
        """What was counted since the previous call (or since the start), then a new mark.

        Returns ``{"points": {point: {figure: change}}, "buckets": [...], "parameters": [...]}``:
        per drop point, every whole-number figure of :meth:`stats` (``packets_sent``,
        ``packets_lost``, ``bytes_sent``, ...); per bucket and point with packets sent in the interval (the
        :meth:`stats` bucket fields with ``packets_sent``, ``packets_lost``, ``loss_rate``
        and the bucket's parameter names ``params``); per parameter and point (the
        :meth:`loss_by_parameter` fields). Use one scope (``all_ranks``) for every call:
        the mark stores what was read. A collective when ``all_ranks``."""
        stats = self.stats(all_ranks)
        by_param = self.loss_by_parameter(names, all_ranks)
        now: dict[str, list[int]] = {}
        for p in self.points:  # every whole-number figure of the drop point
            now |= {f"point:{p}:{f}": [v] for f, v in stats[p].items() if isinstance(v, int)}
        for b, p in ((b, p) for b in stats["buckets"] for p in self.points):
            now[f"bucket:{p}:{b['index']}:{b['numel']}:{b['generation']}"] = [b[f"{p}_sent"], b[f"{p}_lost"]]
        for r in by_param:
            now[f"param:{r['drop_point']}:{r['parameter']}"] = [r["packets_sent"], r["packets_lost"]]
        prev, self.mark = self.mark, now

        def delta(name: str) -> tuple[int, int]:
            s0, l0 = prev.get(name, (0, 0))
            return now[name][0] - s0, now[name][1] - l0

        buckets = []
        for b in stats["buckets"]:
            key = (b["index"], b["numel"], b["generation"])
            entry = self.buckets.get(key)
            ids = entry.param_ids if entry is not None else None
            label = entry.label if entry is not None and entry.label else "?"
            params = [names.get(i, "?") for i in ids] if ids else [label]
            for p in self.points:
                sent, lost = delta(f"bucket:{p}:{key_str(key)}")
                if sent:
                    row = {k: b[k] for k in ("index", "numel", "generation", "packets")}
                    row |= {"drop_point": p, "params": params, "packets_sent": sent, "packets_lost": lost}
                    buckets.append(row | {"loss_rate": lost / sent})
        parameters = []
        for r in by_param:
            sent, lost = delta(f"param:{r['drop_point']}:{r['parameter']}")
            parameters.append(
                r | {"packets_sent": sent, "packets_lost": lost, "loss_rate": lost / sent if sent else 0.0}
            )
        points = {
            p: {f: v - prev.get(f"point:{p}:{f}", [0])[0] for f, v in stats[p].items() if isinstance(v, int)}
            for p in self.points
        }
        return {"points": points, "buckets": buckets, "parameters": parameters}

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters (CPU tensors), bucket registry, mark; ``torch.load(weights_only=True)`` safe."""
        return {
            "buckets": {
                key_str(k): {"packets": e.packets, "sizes": list(e.sizes), "wire_bytes": e.wire_bytes}
                | ({"label": e.label} if e.label else {})
                for k, e in self.buckets.items()
            },
            "sent": {p: {key_str(k): n for k, n in d.items()} for p, d in self.sent.items()},
            "lost": {p: {key_str(k): v.detach().cpu() for k, v in d.items()} for p, d in self.lost.items()},
            "unrecovered": {key_str(k): v.detach().cpu() for k, v in self.unrecovered.items()},
            "protection": {
                p: {key_str(k): v.detach().cpu() for k, v in d.items()} for p, d in self.protection.items()
            },
            "mark": {k: list(v) for k, v in self.mark.items()},
        }

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
        self._fidelity = {}
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

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
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lossy_hooks.core.counters import BucketEntry, BucketKey, PacketCounters, key_str
from lossy_hooks.core.process_group import collective_device, reliable
from lossy_hooks.core.techniques.hadamard import carrying_packets
from lossy_hooks.core.techniques.protection import COUNTERS

__all__ = ["PacketLedger"]


class PacketLedger(PacketCounters):
    """The counters of one :class:`~lossy_hooks.LossyState`
    (:class:`~lossy_hooks.core.counters.PacketCounters`: what the hook writes) and the
    questions a study asks of them (see the module)."""

    def _collective_device(self) -> torch.device:
        """The buckets' device once one was seen; before that the group backend's."""
        if self.device is not None:
            return self.device
        if dist.is_available() and dist.is_initialized():
            return collective_device(self.process_group)
        return torch.device("cpu")

    def _sum_over_ranks(self, vec: torch.Tensor) -> None:
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        with reliable():  # the counts are control traffic: never lost on a lossy group
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
        if self.collectives:
            out["collectives"] = self.collective_rows(all_ranks)
        if self.links:
            out["links"] = self.link_rows()
            for p in self.points:  # contributions (worker) / result packets (post) delivered
                sent = out[p]["packets_sent"]
                out[p]["delivered_fraction"] = 1.0 - out[p]["packets_lost"] / sent if sent else 1.0
        return out

    def collective_rows(self, all_ranks: bool = False) -> dict[str, dict[str, Any]]:
        """The lossy process group's collectives, per kind: ``calls``, ``packets_sent`` (put at
        risk for this rank: what it sent into a reduction, or what was sent to it),
        ``packets_lost``, ``loss_rate`` and ``bytes_sent``; summed over the group with
        ``all_ranks=True`` (a collective). One host read."""
        kinds = sorted(self.collectives)
        device = self._collective_device()
        zero = torch.zeros((), dtype=torch.int64, device=device)
        rows = [
            torch.stack(
                (
                    *(torch.tensor(x, dtype=torch.int64, device=device) for x in self.collectives[k]),
                    self.collective_lost.get(k, zero).to(device),
                )
            )
            for k in kinds
        ]
        vec = torch.stack(rows).double()
        if all_ranks:
            self._sum_over_ranks(vec)
        out = {}
        for kind, (calls, packets, nbytes, lost) in zip(kinds, vec.tolist(), strict=True):
            out[kind] = {
                "calls": round(calls),
                "packets_sent": round(packets),
                "packets_lost": round(lost),
                "loss_rate": lost / packets if packets else 0.0,
                "bytes_sent": round(nbytes),
            }
        return out

    def link_rows(self) -> list[dict[str, Any]]:
        """A per-hop placement's links: per phase and link (``"src->dst"``), packets carried
        and lost and the loss rate, the same on every rank (not summed over ranks). One host
        read."""
        lost = {phase: v.tolist() for phase, v in self.link_lost.items()}
        rows = []
        for phase, names in self.links.items():
            for name, carried, n_lost in zip(
                names, self.link_carried[phase].tolist(), lost[phase], strict=True
            ):
                rows.append(
                    {
                        "phase": phase,
                        "link": name,
                        "packets_carried": carried,
                        "packets_lost": n_lost,
                        "loss_rate": n_lost / carried if carried else 0.0,
                    }
                )
        return rows

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

    def fidelity(self, steps_done: int, all_ranks: bool = False) -> list[dict[str, float]]:
        """Per finished step (``< steps_done``) since the last call: cosine similarity and
        relative L2 error of the lossy aggregate against the lossless one.

        Over all buckets of a step, with ``x`` lossy and ``y`` lossless:
        ``cos = <x, y> / (|x| |y|)`` (1 when both are 0), ``rel_l2 = |x - y| / |y|`` (0 when equal).
        With ``all_ranks`` the four sums are added over the group first (a collective: every
        rank calls it, with the same steps finished): the vectors are then every rank's
        results side by side (a reduce-scatter's shards: the whole reduced gradient).
        """
        steps = sorted(s for s in self.pending_fidelity if s < steps_done)
        if not steps:
            return []
        sums = torch.stack([torch.stack(self.pending_fidelity.pop(s)).sum(0) for s in steps])
        if all_ranks:
            sums = sums.to(self._collective_device())
            self._sum_over_ranks(sums)
        out = []
        for step, row in zip(steps, sums.tolist(), strict=True):
            dot, xx, yy, dd = row
            cos = 1.0 if xx == 0 and yy == 0 else dot / math.sqrt(xx * yy) if xx * yy > 0 else 0.0
            rel = 0.0 if dd == 0 else (math.sqrt(dd / yy) if yy > 0 else math.inf)
            out.append({"step": step, "cosine": cos, "rel_l2": rel})
        return out

    def since_mark(self, names: dict[int, str], all_ranks: bool = True) -> dict[str, Any]:
        """What was counted since the previous call (or since the start), then a new mark.

        Returns ``{"points": {point: {figure: change}}, "buckets": [...], "parameters": [...],
        "links": [...], "collectives": {kind: {figure: change}}}``:
        per drop point, every whole-number figure of :meth:`stats` (``packets_sent``,
        ``packets_lost``, ``bytes_sent``, ...); per bucket and point with packets sent in the interval (the
        :meth:`stats` bucket fields with ``packets_sent``, ``packets_lost``, ``loss_rate``
        and the bucket's parameter names ``params``); per parameter and point (the
        :meth:`loss_by_parameter` fields); per link of a per-hop placement; per kind of a
        lossy process group's collectives (:meth:`collective_rows`' whole-number figures and
        the interval's ``loss_rate``). Use one scope (``all_ranks``) for every call:
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
        for r in stats.get("links", []):
            now[f"link:{r['phase']}:{r['link']}"] = [r["packets_carried"], r["packets_lost"]]
        for kind, figures in stats.get("collectives", {}).items():
            now |= {f"kind:{kind}:{f}": [v] for f, v in figures.items() if isinstance(v, int)}
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
        links = []
        for r in stats.get("links", []):
            carried, lost = delta(f"link:{r['phase']}:{r['link']}")
            links.append(
                r
                | {
                    "packets_carried": carried,
                    "packets_lost": lost,
                    "loss_rate": lost / carried if carried else 0.0,
                }
            )
        return {
            "points": points,
            "buckets": buckets,
            "parameters": parameters,
            "links": links,
            "collectives": _collective_changes(stats.get("collectives", {}), prev),
        }


def _collective_changes(
    now: dict[str, dict[str, Any]], prev: dict[str, list[int]]
) -> dict[str, dict[str, Any]]:
    """Per kind of a lossy group's collectives: each whole-number figure's change since the
    mark ``prev`` (keys ``kind:<kind>:<figure>``), and the interval's loss rate."""
    out = {}
    for kind, figures in now.items():
        change = {
            f: v - prev.get(f"kind:{kind}:{f}", [0])[0] for f, v in figures.items() if isinstance(v, int)
        }
        sent = change["packets_sent"]
        out[kind] = change | {"loss_rate": change["packets_lost"] / sent if sent else 0.0}
    return out

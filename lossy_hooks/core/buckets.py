"""One record per bucket the hook has seen: what travels (its packets, in the wire dtype,
padded to its blocks when encoded), which packets are protected, the post-drop rescale
factors, and the buffers the hook keeps between steps (stale values, error-feedback
residuals), with their checkpoint state."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lossy_hooks.core.counters import BucketEntry, BucketKey, key_from_str, key_str
from lossy_hooks.core.packetization import PacketLayout
from lossy_hooks.core.techniques.fills import post_rescale_factor
from lossy_hooks.core.techniques.hadamard import block_edges, padded_numel
from lossy_hooks.core.techniques.protect import protected_packets
from lossy_hooks.core.techniques.protection import COUNTERS
from lossy_hooks.core.techniques.wire_dtype import wire_dtype_of
from lossy_hooks.loss_models import Bernoulli

if TYPE_CHECKING:
    from lossy_hooks.core.ledger import PacketLedger
    from lossy_hooks.core.options import LossConfig
    from lossy_hooks.core.streams import DropSite

__all__ = ["BucketRecord", "BucketRecords"]


@dataclass
class BucketRecord:
    """What the hook keeps for one bucket key in this process."""

    key: BucketKey
    layout: PacketLayout  # packets of what travels (wire dtype; padded blocks with an encoding)
    wire_bytes: int  # bytes of what travels: the clock prices them, the ledger counts them, and a
    # deadline post rescale takes its keep fraction at them
    post_factor: float | torch.Tensor  # 1 / E[kept] of a post drop (per packet with protection)
    stale: torch.Tensor | None = None  # the last received value of each element (fill="stale")
    protected: torch.Tensor | None = None  # packets never lost (protect=...)
    lossless_counters: torch.Tensor | None = None  # protection counters of a call that loses nothing
    residual: torch.Tensor | None = None  # error feedback: what this rank's uplink lost last time


class BucketRecords:
    """The :class:`BucketRecord` of every bucket key of one :class:`~lossy_hooks.LossyState`,
    and the buffers saved for keys not seen again yet (after a resume). It reads what it
    needs and nothing else: the settings, the ledger it registers buckets in, the post drop
    site's model (the post-rescale factor) and the parameters' names (``protect=``)."""

    def __init__(
        self, settings: LossConfig, ledger: PacketLedger, post: DropSite, parameter_names: dict[int, str]
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.post = post
        self.parameter_names = parameter_names  # the state's dict, filled by name_parameters
        self.records: dict[BucketKey, BucketRecord] = {}
        self.key_of: dict[tuple[int, tuple[int, ...]], BucketKey] = {}  # (index, param ids) -> key
        self.saved_stale: dict[BucketKey, torch.Tensor] = {}
        self.saved_residual: dict[BucketKey, torch.Tensor] = {}

    def to(self, device: torch.device) -> None:
        """Move every tensor kept (a model moved to another device, or a resume)."""
        for record in self.records.values():
            for name in ("stale", "protected", "lossless_counters", "residual", "post_factor"):
                value = getattr(record, name)
                if isinstance(value, torch.Tensor):
                    setattr(record, name, value.to(device))
        self.saved_stale = {k: v.to(device) for k, v in self.saved_stale.items()}
        self.saved_residual = {k: v.to(device) for k, v in self.saved_residual.items()}

    def lookup(self, bucket: dist.GradBucket, buf: torch.Tensor) -> BucketRecord:
        """The record of this bucket, keyed on what it holds.

        Keyed on its index and the identities of its parameters, in order. DDP rebuilds its
        buckets after the first iteration, and a rebuilt bucket can keep its index and size
        but hold other parameters, or the same ones in another order: it gets a key of its own
        (the next generation at that index and size), hence its own packet layout, loss
        counters, per-parameter accounting and stale buffer. After :meth:`load_state_dict` (a
        new process: new identities) a bucket takes over the saved key of the same index,
        size and parameter sizes, the most recent generation first."""
        params = bucket.parameters()
        ids = (buf.numel(), *map(id, params))
        key = self.key_of.get((bucket.index(), ids))
        if key is not None:
            return self.records[key]
        sizes = tuple(p.numel() for p in params)
        if self.settings.packetization == "tensor" and sum(sizes) != buf.numel():
            raise RuntimeError(
                f"bucket {bucket.index()}: parameters hold {sum(sizes)} elements, buffer {buf.numel()}"
            )
        index, numel = bucket.index(), buf.numel()
        known = self.ledger.buckets
        claimed = set(self.key_of.values())
        same = [k for k in known if k[:2] == (index, numel)]
        saved = [k for k in same if k not in claimed and known[k].sizes == sizes]
        key = max(saved) if saved else (index, numel, max((k[2] + 1 for k in same), default=0))
        record = self._new_record(key, sizes, buf, params)
        if self.settings.error_feedback and record.residual is None:
            record.residual = self._adopt_residuals(tuple(ids[1:]), sizes, buf)
        self.key_of[(index, ids)] = key
        return self._keep(key, record, numel, sizes, tuple(ids[1:]))

    def _keep(
        self,
        key: BucketKey,
        record: BucketRecord,
        numel: int,
        sizes: tuple[int, ...],
        param_ids: tuple[int, ...] | None = None,
        label: str | None = None,
    ) -> BucketRecord:
        """Keep a new record under ``key`` and register its key in the ledger: packets,
        parameter sizes and ids, bytes on the wire, the encoding's blocks over ``numel``
        elements, and a ``label`` where it holds no list of parameters."""
        self.records[key] = record
        layout = record.layout
        packet_numel = None if layout.per_tensor else layout.packet_numel
        wire_bytes, blocks = record.wire_bytes, self._edges(numel)
        entry = BucketEntry(layout.num_packets, sizes, param_ids, packet_numel, wire_bytes, blocks, label)
        self.ledger.register(key, entry)
        return record

    def _new_record(
        self,
        key: BucketKey,
        sizes: tuple[int, ...],
        buf: torch.Tensor,
        params: list[torch.Tensor],
        post_rows: int = 1,
    ) -> BucketRecord:
        """Packets of what travels (``buf``: a bucket, or one row of a shard set): the buffer
        in the wire dtype, padded to its blocks when encoded; protected packets; the
        post-rescale factors of a post draw over ``post_rows`` such rows; saved stale and
        residual buffers."""
        numel, settings = buf.numel(), self.settings
        wire_itemsize = wire_dtype_of(settings.wire_dtype, buf.dtype).itemsize
        if settings.packetization == "tensor":
            layout = PacketLayout.by_tensor(sizes)
        else:
            encoded = settings.encoding == "hadamard"
            wire_numel = padded_numel(numel, settings.hadamard_block) if encoded else numel
            layout = PacketLayout.by_mtu(wire_numel, settings.mtu, wire_itemsize)
        n = layout.num_packets
        wire_bytes = layout.numel * wire_itemsize
        protected = self._protected_packets(layout, params, numel)  # on the CPU
        factor: float | torch.Tensor
        if settings.protection.active and isinstance(settings.loss_model, Bernoulli):
            factor = 1.0 / settings.protection.bernoulli_keep(settings.loss_model.p, n)
        elif settings.placement.per_hop or not settings.drops_after:
            factor = 1.0  # unused: per hop the masks bring their own (HopMasks.post_factor)
        else:
            factor = post_rescale_factor(self.post.model, post_rows * n, post_rows * wire_bytes)
        if protected is not None:
            factor = torch.where(protected, 1.0, torch.as_tensor(factor, dtype=torch.float64))
        if isinstance(factor, torch.Tensor):
            factor = factor.float().to(buf.device)
        on_device = None if protected is None else protected.to(buf.device)
        record = BucketRecord(key, layout, wire_bytes, factor, self.saved_stale.pop(key, None), on_device)
        record.residual = self.saved_residual.pop(key, None)
        if settings.protecting:
            base = torch.zeros(len(COUNTERS), dtype=torch.int64)
            base[0] = settings.protection.parity_packets(n)
            base[4] = 0 if protected is None else int(protected.sum())
            record.lossless_counters = base.to(buf.device)
        return record

    def shard_record(self, index: int, label: str, rows: torch.Tensor, post_rows: int) -> BucketRecord:
        """The record of FSDP unit ``index`` (named ``label``) for a ``(W, numel)`` shard set:
        the packet layout of one row as it travels (a packet never crosses a row; in the
        wire dtype, padded to its blocks when encoded), the post-rescale factor of a draw of
        ``post_rows`` rows' packets, and the stale buffer and error-feedback residuals saved
        in a checkpoint; registered in the ledger on first sight, keyed
        ``(index, rows.numel(), 0)``."""
        key = (index, rows.numel(), 0)
        record = self.records.get(key)
        if record is None:
            record = self._new_record(key, (), rows[0], [], post_rows)
            self._keep(key, record, rows.shape[1], (), label=label)
        return record

    def flat_record(self, index: int, label: str, buf: torch.Tensor) -> BucketRecord:
        """The record of a flat buffer of a lossy process group's all-reduce (``label``: its
        kind, size and dtype; ``index``: the group's number for that label), packetized by
        the MTU like a DDP bucket of one tensor, registered in the ledger on first sight,
        keyed ``(index, numel, 0)``."""
        key = (index, buf.numel(), 0)
        record = self.records.get(key)
        if record is None:
            record = self._new_record(key, (buf.numel(),), buf, [])
            self._keep(key, record, buf.numel(), (buf.numel(),), label=label)
        return record

    def _edges(self, numel: int) -> tuple[int, ...]:
        """The edges of the blocks over which the encoding spreads a packet's loss (``()``
        without one: a packet's loss stays in its own elements)."""
        return (
            block_edges(numel, self.settings.hadamard_block) if self.settings.encoding == "hadamard" else ()
        )

    def _protected_packets(
        self, layout: PacketLayout, params: list[torch.Tensor], numel: int
    ) -> torch.Tensor | None:
        """The packets ``protect`` selects (:func:`~lossy_hooks.core.techniques.protect.protected_packets`,
        built once per key, on the CPU); ``None`` without ``protect``."""
        rule = self.settings.protect_rule
        if rule is None:
            return None
        if not self.parameter_names:
            raise ValueError(
                "protect=... matches parameter names: call state.name_parameters(model) before training"
            )
        return protected_packets(rule, self.parameter_names, layout, params, self._edges(numel))

    def _adopt_residuals(
        self, ids: tuple[int, ...], sizes: tuple[int, ...], buf: torch.Tensor
    ) -> torch.Tensor | None:
        """Error feedback across a bucket rebuild: the residuals other buckets of this process
        hold for this bucket's parameters move here, slice by slice, so no lost gradient is
        dropped when DDP regroups its parameters (after its first iteration)."""
        offsets = dict(zip(ids, itertools.accumulate(sizes, initial=0), strict=False))
        residual = None
        for other in self.records.values():
            entry = self.ledger.buckets.get(other.key)
            if other.residual is None or entry is None or entry.param_ids is None:
                continue
            start = 0
            for pid, size in zip(entry.param_ids, entry.sizes, strict=True):
                if pid in offsets:
                    residual = torch.zeros_like(buf) if residual is None else residual
                    residual[offsets[pid] : offsets[pid] + size].add_(other.residual[start : start + size])
                    other.residual[start : start + size].zero_()
                start += size
        return residual

    def stale_buffer(self, record: BucketRecord, like: torch.Tensor) -> torch.Tensor:
        if record.stale is None:
            # A rebuilt bucket with the same index replaces the old one's buffer.
            for other in self.records.values():
                if other.key[0] == record.key[0]:
                    other.stale = None
            self.saved_stale = {k: v for k, v in self.saved_stale.items() if k[0] != record.key[0]}
            record.stale = torch.zeros_like(like)
        return record.stale

    def state_dict(self) -> dict[str, Any]:
        """Stale buffers and error-feedback residuals by key (CPU tensors)."""
        stale = {k: r.stale for k, r in self.records.items() if r.stale is not None} | self.saved_stale
        residual = {k: r.residual for k, r in self.records.items() if r.residual is not None}
        residual |= self.saved_residual
        return {
            "stale": {key_str(k): v.detach().cpu() for k, v in stale.items()},
            "residual": {key_str(k): v.detach().cpu() for k, v in residual.items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.records, self.key_of = {}, {}
        self.saved_stale = {key_from_str(k): v.clone() for k, v in sd["stale"].items()}
        self.saved_residual = {key_from_str(k): v.clone() for k, v in sd.get("residual", {}).items()}

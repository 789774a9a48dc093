"""The state of the lossy hook: its configuration (checked), its random streams, and one
record per bucket (packet layout, post-rescale factor, stale buffer). Everything it counts
lives in its :class:`~lossy_hooks.core.ledger.PacketLedger` (``state.ledger``)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from lossy_hooks.core.buckets import BucketRecord, BucketRecords
from lossy_hooks.core.counters import BucketKey
from lossy_hooks.core.declaration import Setting, arguments_doc
from lossy_hooks.core.ledger import PacketLedger
from lossy_hooks.core.netclock import SimClock
from lossy_hooks.core.network import NetworkModel
from lossy_hooks.core.options import (
    LossConfig,
    ProtectRule,
    check_append_counts,
    resolve_counts_transport,
)
from lossy_hooks.core.pipeline.delivery import Delivery
from lossy_hooks.core.placement import PHASES_OF_DROP_POINT, HopLoss, HopMasks, HopPlacement
from lossy_hooks.core.process_group import collective_device
from lossy_hooks.core.settings_view import SettingsView
from lossy_hooks.core.streams import DropSite, DropSites, derive_seed
from lossy_hooks.core.techniques import BucketCall, Technique, wire_chain
from lossy_hooks.core.techniques.wire_dtype import wire_dtype_of
from lossy_hooks.loss_models import (
    DeadlineLoss,
    LossModel,
)

__all__ = [
    "BucketRecord",
    "BucketRecords",
    "DropSite",
    "LossyState",
    "collective_device",
    "derive_seed",
    "resolve_counts_transport",
]

STATE_VERSION = 4
NOT_REACHED = (
    "no gradient bucket has reached this LossyState yet: if training steps have run, the lossy "
    "hook is not registered on the DDP module that trains (registered on another module, or a "
    "framework that skipped it, e.g. Lightning's DDPStrategy on CPU), and nothing was lost; "
    "see README 'Where you already train'"
)
# LossyState's two arguments that are not settings (LossConfig declares the others)
LOSS_RATE = Setting(
    "a Bernoulli model's shorthand: give it or loss_model (None with no loss_model: no loss)",
    allowed="a probability in [0, 1], or None",
)
PROCESS_GROUP = Setting(
    "the group to reduce over (default: the world); not part of the settings, not saved",
    allowed="a ProcessGroup or None",
)


class LossyState(SettingsView):
    r"""State of :func:`~lossy_hooks.lossy_allreduce_hook` and of the FSDP collectives: its
    settings (``state.settings``, a :class:`~lossy_hooks.core.options.LossConfig`, where every
    argument is checked: a bad one raises ``ValueError`` naming it and the allowed values),
    its random streams (``state.sites``), the technique chain (``state.techniques``), one
    record per bucket (``state.buckets``) and the :class:`~lossy_hooks.core.ledger.PacketLedger`
    of what was lost. What needs the bucket is checked at the first bucket (``ValueError``
    from inside the backward pass): that ``mtu`` holds one element of the bucket's dtype, and
    that ``counts_transport="append"`` counts the group's ranks exactly in the wire dtype.

    The arguments are ``LossConfig``'s settings (each default in the signature is the one
    declared there), plus ``loss_rate`` and ``process_group``; the "Arguments" below are made
    from those declarations at import (docs/reference.md lists them too, checked by a test).
    """

    def __init__(
        self,
        loss_rate: float | None = None,
        mtu: int = LossConfig.mtu,
        drop_point: str = LossConfig.drop_point,
        fill: str = LossConfig.fill,
        reduction: str = LossConfig.reduction,
        post_sync: str = LossConfig.post_sync,
        packetization: str = LossConfig.packetization,
        loss_model: LossModel | str | None = LossConfig.loss_model,
        seed: int = LossConfig.seed,
        process_group: dist.ProcessGroup | None = None,
        counts_transport: str = LossConfig.counts_transport,
        measure_fidelity: bool = LossConfig.measure_fidelity,
        encoding: str = LossConfig.encoding,
        hadamard_block: int = LossConfig.hadamard_block,
        wire_dtype: str = LossConfig.wire_dtype,
        error_feedback: bool = LossConfig.error_feedback,
        protect: str | ProtectRule | None = LossConfig.protect,
        retransmit: int = LossConfig.retransmit,
        fec: tuple[int, int] | None = LossConfig.fec,
        network: NetworkModel | None = LossConfig.network,
        algorithm: str = LossConfig.algorithm,
        ranks_per_node: int | None = LossConfig.ranks_per_node,
        link_loss: Any = LossConfig.link_loss,
    ) -> None:
        arguments = dict(locals())  # exactly the parameters above: LossConfig takes them all
        del arguments["self"], arguments["process_group"]
        self.settings = LossConfig.from_arguments(**arguments)
        loss_model = self.loss_model
        deadline = loss_model.deadline if isinstance(loss_model, DeadlineLoss) else None
        phases = PHASES_OF_DROP_POINT[self.drop_point]
        self.clock = SimClock(network, deadline, self.placement, phases) if network is not None else None
        self.process_group = process_group
        # what the DDP hook does to a bucket, in order (techniques.CHAIN)
        self.techniques: tuple[Technique, ...] = wire_chain(self.settings, self.fill_technique)
        self.sites = DropSites(loss_model, self.post_sync)
        points = tuple(site.name for site in self.placement.sites(self.drop_point))
        self.protecting = self.settings.protecting
        unrecovered = self.drops_before and self.fill_technique.needs_counts
        self.ledger = PacketLedger(points, unrecovered, process_group, track_protection=self.protecting)
        self.hops: HopLoss | None = None  # the per-link streams of a per-hop placement
        if isinstance(self.placement, HopPlacement):
            phases = PHASES_OF_DROP_POINT[self.drop_point]
            self.hops = HopLoss(self.placement, loss_model, self.settings.link_rules, phases)
        self.parameter_names: dict[int, str] = {}
        self.steps = 0
        self.rank: int | None = None
        self.world_size: int | None = None
        self.device: torch.device | None = None
        self.buckets = BucketRecords(self.settings, self.ledger, self.sites.post, self.parameter_names)
        self.delivery = Delivery(self.settings, self.ledger)  # the lossy group's all-to-all, ...
        self.passing_through = False
        self.bucket_calls = 0  # hook calls, passthrough ones included
        self._warned_unreached = False
        self.counts_resolved: str | None = None if self.counts_transport == "auto" else self.counts_transport

    # -- configuration ----------------------------------------------------------------

    @property
    def worker(self) -> DropSite:
        """The worker drop site's stream (``sites.worker``)."""
        return self.sites.worker

    @property
    def post(self) -> DropSite:
        """The post drop site's stream (``sites.post``)."""
        return self.sites.post

    @property
    def rotation(self) -> DropSite:
        """The Hadamard signs' stream (``sites.rotation``)."""
        return self.sites.rotation

    @property
    def peers(self) -> dict[int, DropSite]:
        """Every other rank's replayed worker stream (``sites.peers``)."""
        return self.sites.peers

    @property
    def hook_reached(self) -> bool:
        """Whether any gradient bucket has reached this state (in this process, or before
        the checkpoint it was loaded from). ``False`` after training steps means the hook is
        not registered on the DDP module that trains: nothing was lost."""
        return self.bucket_calls > 0 or self.steps > 0

    @property
    def counts_transport_in_use(self) -> str | None:
        """The counts transport in effect (``"auto"`` resolved at the first bucket; ``None`` before it)."""
        return self.counts_resolved

    def config(self) -> dict[str, Any]:
        """The settings, as plain values (for configs and run names; :meth:`LossConfig.as_dict`)."""
        return self.settings.as_dict()

    def options(self) -> dict[str, Any]:
        """The option settings, as plain values (:meth:`LossConfig.options`)."""
        return self.settings.options()

    def name_parameters(self, module: torch.nn.Module) -> None:
        """Tell the state the names of ``module``'s parameters (``protect=`` matches them)."""
        self.parameter_names.clear()  # in place: the bucket records read this dict
        self.parameter_names.update({id(p): n for n, p in module.named_parameters()})

    # -- used by the hook -----------------------------------------------------------------

    def prepare(self, buf: torch.Tensor, group: Any) -> None:
        """At the first bucket on a device: rank, world size, generators, the counts rule."""
        if self.device == buf.device:
            return
        self.device = buf.device
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if self.clock is not None:
            self.clock.prepare(buf.device, self.seed, self.world_size)
        self.ledger.to(buf.device)
        self.buckets.to(buf.device)
        if self.hops is not None:  # every rank replays every hop: the counts are regenerated
            self.counts_resolved = "regenerate"
            self.hops.prepare(buf.device, self.seed, self.rank, self.world_size)
        if self.counts_resolved is None:
            self.counts_resolved = resolve_counts_transport("auto", buf.device, self.world_size)
        uses_counts = self.drops_before and self.fill_technique.needs_counts
        if uses_counts and self.counts_resolved == "append":
            check_append_counts(self.world_size, self.wire_dtype_for(buf))
        replay = self.counts_resolved == "regenerate" and uses_counts and self.hops is None
        self.sites.prepare(buf.device, self.seed, self.rank, self.world_size, replay)
        if self.clock is not None:
            self.sites.bind_deadlines(self.clock, self.rank)
            if self.hops is not None:
                self.hops.bind_clock(self.clock)

    def draw_masks(self, call: BucketCall) -> None:
        """This call's loss masks (``call.lost``, ``call.post_lost``), its post-rescale factor
        and, on a per-hop placement, the arrival counts, counted in the ledger (per drop
        point; per link on a per-hop placement)."""
        record = call.record
        call.post_factor = record.post_factor
        if self.hops is None:
            call.lost = self.draw(self.worker, record) if self.drops_before else None
            call.post_lost = self.draw(self.post, record) if self.drops_after else None
            return
        n = record.layout.num_packets
        counts = self.drops_before and self.fill_technique.needs_counts
        post_rescale = self.drops_after and self.fill_technique.needs_counts
        masks = self.hop_masks(n, record.wire_bytes, counts, post_rescale)
        call.lost, call.post_lost, call.arrivals = masks.lost, masks.post_lost, masks.arrivals
        if masks.post_factor is not None:
            call.post_factor = masks.post_factor
        for point, lost in (("worker", masks.lost), ("post", masks.post_lost)):
            if point in self.ledger.points:
                self.ledger.count(point, record.key, n, lost)

    def hop_masks(self, packets: int, nbytes: float, counts: bool, post_rescale: bool) -> HopMasks:
        """A per-hop placement: this rank's masks of one collective of ``packets`` packets
        (``nbytes`` on the wire; :meth:`HopLoss.masks`), each link's carried and lost
        packets counted in the ledger (the drop points are the caller's to count: a DDP
        bucket counts every packet, an FSDP shard set the rows that cross the network)."""
        assert self.hops is not None and self.device is not None
        masks = self.hops.masks(packets, counts, post_rescale, self.device, nbytes)
        for phase, lost in masks.link_lost.items():
            carried = self.hops.carried(phase, packets, self.device)
            self.ledger.count_links(phase, self.hops.links[phase], carried, lost)
        return masks

    def draw(self, site: DropSite, record: BucketRecord) -> torch.Tensor | None:
        """The loss mask of this bucket at ``site`` after FEC, retransmission and protection
        (:class:`~lossy_hooks.core.techniques.protection.Protection`), counted in the ledger."""
        n = record.layout.num_packets
        if site.lossless or not self.protecting:
            lost = site.draw(n)
            counters = record.lossless_counters if self.protecting else None
        else:
            assert self.device is not None
            lost, counters = self.protection.resolve(n, site.draw, record.protected, self.device)
        self.ledger.count(site.name, record.key, n, lost)
        if counters is not None:
            self.ledger.count_protection(site.name, record.key, counters)
        return lost

    def peer_draws(self, record: BucketRecord) -> list[tuple[int, Callable[[int], torch.Tensor | None]]]:
        """``(rank, draw)`` of every other rank's replayed worker stream (``counts_transport=
        "regenerate"``), ``draw(m)`` its loss mask of ``m`` packets through the same FEC,
        retransmission and protection as this rank's own (for
        :func:`~lossy_hooks.core.techniques.fills.regenerated_counts`)."""
        if not self.protecting:
            return [(rank, site.draw) for rank, site in self.sites.peers.items()]
        protection, device = self.protection, self.device
        assert device is not None

        def through_protection(site: DropSite) -> Callable[[int], torch.Tensor | None]:
            return lambda m: protection.resolve(m, site.draw, record.protected, device)[0]

        return [(rank, through_protection(site)) for rank, site in self.sites.peers.items()]

    def wire_dtype_for(self, buf: torch.Tensor) -> torch.dtype:
        return wire_dtype_of(self.wire_dtype, buf.dtype)

    @contextlib.contextmanager
    def passthrough(self) -> Iterator[None]:
        """While active the hook is an exact lossless allreduce that draws no random
        numbers and counts nothing. Use it for a warm-up iteration that lets DDP rebuild
        its buckets, so that a fresh run and a resumed one see the same bucket layouts and
        therefore the same loss sequence."""
        previous, self.passing_through = self.passing_through, True
        try:
            yield
        finally:
            self.passing_through = previous

    # -- what was counted (see PacketLedger) ------------------------------------------------

    def stats(self, all_ranks: bool = False) -> dict[str, Any]:
        """Packets sent and lost so far, per drop point and per bucket.

        Counters live on the device and are read here (one host sync). With
        ``all_ranks=True`` they are summed over the process group (a collective: call it on
        every rank, outside the backward pass). For the worker drop point "sent" counts this
        rank's packets to the collective; for post, packets of the result delivered to it.
        ``packets_unrecovered`` (worker rescale) counts packets no rank's copy reached.
        """
        scope = "all ranks" if all_ranks else f"rank {self.rank}"
        head: dict[str, Any] = {"steps": self.steps, "world_size": self.world_size, "scope": scope}
        head["hook_reached"] = self.hook_reached
        if not self.hook_reached:
            head["warning"] = NOT_REACHED
            if not self._warned_unreached:
                self._warned_unreached = True
                warnings.warn(NOT_REACHED, RuntimeWarning, stacklevel=2)
        return head | self.ledger.stats(all_ranks)

    def loss_by_parameter(self, names: dict[int, str], all_ranks: bool = False) -> list[dict[str, Any]]:
        """Packets sent and lost per parameter gradient (:meth:`PacketLedger.loss_by_parameter`)."""
        return self.ledger.loss_by_parameter(names, all_ranks)

    def bucket_parameter_ids(self) -> dict[BucketKey, list[int]]:
        """``id()`` of the parameters in each bucket seen in this process, in buffer order."""
        return {k: list(e.param_ids) for k, e in self.ledger.buckets.items() if e.param_ids is not None}

    def fidelity(self, all_ranks: bool = False) -> list[dict[str, float]]:
        """Per finished step since the last call: cosine similarity and relative L2 error of
        the lossy aggregate against the lossless one (``measure_fidelity=True``; see
        :meth:`PacketLedger.fidelity`); with ``all_ranks`` over every rank's result (a
        collective; under FSDP each rank holds its own shard of the reduced gradient)."""
        return self.ledger.fidelity(self.steps, all_ranks)

    # -- checkpointing ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the exact loss sequence and its figures: RNG states,
        loss-model memory, stale buffers and the ledger (tensors on CPU;
        ``torch.load(weights_only=True)`` safe). The process group is not included."""
        return (
            self.buckets.state_dict()
            | {
                "version": STATE_VERSION,
                "config": self.config(),
                "steps": self.steps,
                **self.sites.state_dict(),
                "counts_transport_resolved": self.counts_resolved,
                **({"hops": self.hops.state_dict()} if self.hops is not None else {}),
                "ledger": self.ledger.state_dict(),
            }
            | ({"clock": self.clock.state_dict()} if self.clock is not None else {})
            | ({"delivery": self.delivery.state_dict()} if self.delivery.used else {})
        )

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        diff = self.settings.differences(sd["config"])
        if diff:
            raise ValueError(f"LossyState.load_state_dict: settings differ (saved, now): {diff}")
        version = int(sd.get("version", 0))
        if version < 4 and sd["config"].get("encoding") == "hadamard":
            raise ValueError(
                f"LossyState.load_state_dict: this checkpoint (state version {version}) was written with "
                "encoding='hadamard' before version 4, which padded the last block to a whole block "
                "(version 4 splits it into power-of-two blocks, encoding.block_groups): its per-packet "
                "counters do not fit today's packets; start the run again"
            )
        self.steps = int(sd["steps"])
        self.sites.load_state_dict(sd)
        self.buckets.load_state_dict(sd)
        self.counts_resolved = sd.get("counts_transport_resolved", self.counts_resolved)
        if self.hops is not None:
            self.hops.load_state_dict(sd.get("hops", {}))
        ledger = sd["ledger"] if "ledger" in sd else PacketLedger.from_version_2(sd)
        self.ledger.load_state_dict(ledger)
        if self.clock is not None:
            self.clock.load_state_dict(sd["clock"])
        if "delivery" in sd:
            self.delivery.load_state_dict(sd["delivery"])
        self.device = None  # re-prepare on the next bucket: generators restored there

    def __getstate__(self) -> dict[str, Any]:
        # Like PowerSGDState: the process group is not serializable and is left out.
        init = self.settings.arguments()
        del init["loss_model"], init["placement"]
        return {"init": init, "loss_model": copy.deepcopy(self.loss_model), "state": self.state_dict()}

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__init__(loss_model=d["loss_model"], **d["init"])  # type: ignore[misc]
        self.load_state_dict(d["state"])

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"LossyState({cfg})"


def _arguments() -> list[tuple[str, str, Any, Setting]]:
    """``(name, type, default, declaration)`` of every argument of :class:`LossyState`."""
    types = {f.name: str(f.type) for f in dataclasses.fields(LossConfig)}
    settings = [(name, types[name], *declared) for name, declared in LossConfig.declared().items()]
    return [
        ("loss_rate", "float | None", None, LOSS_RATE),
        *settings,
        ("process_group", "dist.ProcessGroup | None", None, PROCESS_GROUP),
    ]


LossyState.__doc__ = (LossyState.__doc__ or "") + arguments_doc(_arguments())

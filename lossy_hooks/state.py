"""The state of the lossy hook: its configuration (checked), its random streams, and one
record per bucket (packet layout, post-rescale factor, stale buffer). Everything it counts
lives in its :class:`~lossy_hooks.ledger.PacketLedger` (``state.ledger``)."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .ledger import BucketEntry, BucketKey, PacketLedger, collective_device, key_from_str, key_str
from .loss_models import Bernoulli, LossModel, check_probability, parse_loss_model
from .packetization import PacketLayout
from .streams import STREAM_POST_INDEPENDENT, STREAM_POST_SHARED, STREAM_WORKER, DropSite, derive_seed

__all__ = [
    "BucketRecord",
    "DropSite",
    "LossyState",
    "collective_device",
    "derive_seed",
    "resolve_counts_transport",
]

DROP_POINTS = ("worker", "post", "both")
FILLS = ("zero", "rescale", "stale")
REDUCTIONS = ("mean", "sum")
POST_SYNCS = ("shared", "independent")
PACKETIZATIONS = ("mtu", "tensor")
COUNTS_TRANSPORTS = ("auto", "separate", "append", "regenerate")
# counts_transport="auto" regenerates on CPU up to this many ranks (see LossyState).
AUTO_REGENERATE_MAX_WORLD = 4
STATE_VERSION = 3
NOT_REACHED = (
    "no gradient bucket has reached this LossyState yet: if training steps have run, the lossy "
    "hook is not registered on the DDP module that trains (registered on another module, or a "
    "framework that skipped it, e.g. Lightning's DDPStrategy on CPU), and nothing was lost; "
    "see README 'Where you already train'"
)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def _whole(name: str, value: Any, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def resolve_counts_transport(requested: str, device: torch.device, world_size: int) -> str:
    """The counts transport ``"auto"`` stands for: ``"regenerate"`` on CPU with at most
    ``AUTO_REGENERATE_MAX_WORLD`` ranks (an extra Gloo collective costs more there than
    sampling ``W`` masks), ``"separate"`` otherwise (on GPUs a few-kB NCCL allreduce is cheap
    and ``W`` x the sampling is not free at large ``W``). Any other choice is returned as is."""
    if requested != "auto":
        return requested
    small_cpu = device.type == "cpu" and world_size <= AUTO_REGENERATE_MAX_WORLD
    return "regenerate" if small_cpu else "separate"


def _exact_count_limit(dtype: torch.dtype) -> int:
    """The largest ``W`` such that every whole number ``0..W`` is exact in ``dtype``."""
    return round(2 / torch.finfo(dtype).eps) if dtype.is_floating_point else 2**31 - 1


@dataclass
class BucketRecord:
    """What the hook keeps for one bucket key in this process."""

    key: BucketKey
    layout: PacketLayout
    post_factor: float  # 1 / E[kept fraction] of a post drop over this bucket's packets (0 if none kept)
    stale: torch.Tensor | None = None  # the last received value of each element (fill="stale")


class LossyState:
    r"""State of :func:`~lossy_hooks.lossy_allreduce_hook`: the configuration, RNGs, one
    record per bucket, and the :class:`~lossy_hooks.ledger.PacketLedger` of what was lost.
    Every argument is checked here (a bad one raises ``ValueError`` naming it and the allowed
    values), except what needs the bucket: that ``mtu`` holds at least one element of the
    bucket's dtype, and that ``counts_transport="append"`` can count the group's ranks
    exactly in that dtype, are checked at the first bucket (``ValueError`` from inside the
    backward pass).

    Args:
        loss_rate: Bernoulli loss probability per packet, in [0, 1] (shorthand for
            ``loss_model=Bernoulli(loss_rate)``). Give this or ``loss_model``, not both.
        mtu: gradient payload bytes per packet (> 0 here; at least one element of the bucket
            dtype, checked at the first bucket).
        drop_point: ``"worker"`` (each rank's contribution, before the allreduce),
            ``"post"`` (the result, after it) or ``"both"``.
        fill: ``"zero"``, ``"rescale"`` (unbiased) or ``"stale"`` (post drop only).
        reduction: ``"mean"`` (DDP's) or ``"sum"``.
        post_sync: ``"shared"`` (same post mask on all ranks) or ``"independent"``.
        packetization: ``"mtu"`` (fixed-size packets) or ``"tensor"`` (one per parameter).
        loss_model: a :class:`~lossy_hooks.loss_models.LossModel` or netem-style text.
        seed: base seed (>= 0); worker masks use (seed, rank), shared post masks seed alone.
        process_group: the group to reduce over (default: the world).
        counts_transport: how worker-drop ``rescale`` learns the arrival counts:
            ``"separate"`` (a small extra allreduce, and ``W/c_j`` applied to the result),
            ``"append"`` (appended to the bucket), ``"regenerate"`` (replays the other ranks'
            masks locally: no communication, ``W/c_j`` folded into the pre-allreduce multiply,
            ``W`` times the sampling work) or ``"auto"``: ``"regenerate"`` on CPU with at most
            ``AUTO_REGENERATE_MAX_WORLD`` ranks, where an extra Gloo collective costs more than
            sampling, else ``"separate"``. All give the same counts; the choice is kept in
            :meth:`state_dict`, so a resumed run keeps it.
        measure_fidelity: also allreduce the lossless bucket and record cosine similarity
            and relative L2 error of the lossy result against it, per step (costs one
            extra full allreduce).
    """

    def __init__(
        self,
        loss_rate: float | None = None,
        mtu: int = 1500,
        drop_point: str = "worker",
        fill: str = "rescale",
        reduction: str = "mean",
        post_sync: str = "shared",
        packetization: str = "mtu",
        loss_model: LossModel | str | None = None,
        seed: int = 0,
        process_group: dist.ProcessGroup | None = None,
        counts_transport: str = "auto",
        measure_fidelity: bool = False,
    ) -> None:
        self.drop_point = _choice("drop_point", drop_point, DROP_POINTS)
        self.fill = _choice("fill", fill, FILLS)
        self.reduction = _choice("reduction", reduction, REDUCTIONS)
        self.post_sync = _choice("post_sync", post_sync, POST_SYNCS)
        self.packetization = _choice("packetization", packetization, PACKETIZATIONS)
        self.counts_transport = _choice("counts_transport", counts_transport, COUNTS_TRANSPORTS)
        self.mtu = _whole("mtu", mtu, 1, "a positive whole number of bytes")
        self.seed = _whole("seed", seed, 0, "a non-negative integer")
        if loss_model is not None and loss_rate is not None:
            raise ValueError("give loss_rate or loss_model, not both")
        if isinstance(loss_model, str):
            loss_model = parse_loss_model(loss_model)
        if loss_model is None:
            loss_model = Bernoulli(check_probability("loss_rate", 0.0 if loss_rate is None else loss_rate))
        if not isinstance(loss_model, LossModel):
            raise ValueError(f"loss_model must be a LossModel or netem-style text, got {loss_model!r}")
        self.loss_model = loss_model
        if self.fill == "stale" and self.drop_point != "post":
            raise ValueError(
                f"fill='stale' needs drop_point='post' (a worker's lost contribution has no "
                f"previous value at the receiver); got drop_point={self.drop_point!r}"
            )
        self.post_keep_rate = 1.0 - loss_model.long_run_loss_rate()
        if self.fill == "rescale" and self.drops_after and self.post_keep_rate <= 0.0:
            raise ValueError(
                "fill='rescale' after the allreduce needs a long-run loss rate < 1 "
                f"(rescales survivors by 1/(1-p)); {loss_model.spec!r} loses every packet"
            )
        self.process_group = process_group
        self.measure_fidelity = bool(measure_fidelity)

        self.worker = DropSite("worker", loss_model.clone(), STREAM_WORKER, per_rank=True)
        shared = self.post_sync == "shared"
        stream = STREAM_POST_SHARED if shared else STREAM_POST_INDEPENDENT
        self.post = DropSite("post", loss_model.clone(), stream, per_rank=not shared)
        points = tuple(p for p, on in (("worker", self.drops_before), ("post", self.drops_after)) if on)
        self.ledger = PacketLedger(points, self.drops_before and self.fill == "rescale", process_group)
        self.steps = 0
        self.rank: int | None = None
        self.world_size: int | None = None
        self.device: torch.device | None = None
        self._buckets: dict[BucketKey, BucketRecord] = {}
        self._key_of: dict[tuple[int, tuple[int, ...]], BucketKey] = {}  # (index, param ids) -> key
        self._saved_stale: dict[BucketKey, torch.Tensor] = {}
        self._passthrough = False
        self._bucket_calls = 0  # hook calls, passthrough ones included
        self._warned_unreached = False
        self._peers: dict[int, DropSite] = {}
        self._saved_peers: dict[int, dict[str, Any]] = {}
        self._counts_resolved: str | None = None if self.counts_transport == "auto" else self.counts_transport

    # -- configuration ----------------------------------------------------------------

    @property
    def drops_before(self) -> bool:
        return self.drop_point in ("worker", "both")

    @property
    def drops_after(self) -> bool:
        return self.drop_point in ("post", "both")

    @property
    def hook_reached(self) -> bool:
        """Whether any gradient bucket has reached this state (in this process, or before
        the checkpoint it was loaded from). ``False`` after training steps means the hook is
        not registered on the DDP module that trains: nothing was lost."""
        return self._bucket_calls > 0 or self.steps > 0

    @property
    def counts_transport_in_use(self) -> str | None:
        """The counts transport in effect (``"auto"`` resolved at the first bucket; ``None`` before it)."""
        return self._counts_resolved

    def config(self) -> dict[str, Any]:
        """The settings, as plain values (for configs and run names)."""
        return {
            "loss_model": self.loss_model.spec,
            "loss_rate": self.loss_model.long_run_loss_rate(),
            "mtu": self.mtu,
            "drop_point": self.drop_point,
            "fill": self.fill,
            "reduction": self.reduction,
            "post_sync": self.post_sync,
            "packetization": self.packetization,
            "seed": self.seed,
            "counts_transport": self.counts_transport,
            "measure_fidelity": self.measure_fidelity,
        }

    # -- used by the hook -----------------------------------------------------------------

    def _prepare(self, buf: torch.Tensor, group: Any) -> None:
        """At the first bucket on a device: rank, world size, generators, the counts rule."""
        if self.device == buf.device:
            return
        self.device = buf.device
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        for site in (self.worker, self.post):
            site.prepare(buf.device, self.seed, self.rank)
        self.ledger.to(buf.device)
        for record in self._buckets.values():
            if record.stale is not None:
                record.stale = record.stale.to(buf.device)
        self._saved_stale = {k: v.to(buf.device) for k, v in self._saved_stale.items()}
        if self._counts_resolved is None:
            self._counts_resolved = resolve_counts_transport("auto", buf.device, self.world_size)
        uses_counts = self.drops_before and self.fill == "rescale"
        if uses_counts and self._counts_resolved == "append":
            limit = _exact_count_limit(buf.dtype)
            if self.world_size > limit:
                raise ValueError(
                    f"counts_transport='append' sends arrival counts in the bucket dtype ({buf.dtype}), "
                    f"exact only up to {limit} ranks; this group has {self.world_size}: use "
                    "counts_transport='separate' (int32 counts)"
                )
        if self._counts_resolved == "regenerate" and uses_counts:
            for peer_rank in range(self.world_size):
                if peer_rank == self.rank:
                    continue
                site = self._peers.get(peer_rank)
                if site is None:
                    name = f"worker of rank {peer_rank}"
                    site = DropSite(name, self.loss_model.clone(), STREAM_WORKER, per_rank=True)
                    if peer_rank in self._saved_peers:
                        site.load_state_dict(self._saved_peers.pop(peer_rank))
                    self._peers[peer_rank] = site
                site.prepare(buf.device, self.seed, peer_rank)

    def _draw(self, site: DropSite, key: BucketKey, num_packets: int) -> torch.Tensor | None:
        """A loss mask from ``site`` for this bucket, counted in the ledger."""
        lost = site.draw(num_packets)
        self.ledger.count(site.name, key, num_packets, lost)
        return lost

    def _regenerated_counts(self, own_lost: torch.Tensor) -> torch.Tensor:
        """``c_j``: this rank's arrivals plus every other rank's, replayed from their generators."""
        counts = (~own_lost).to(torch.int32)
        for site in self._peers.values():
            assert site.generator is not None
            counts += ~site.model.sample(own_lost.numel(), site.generator)
        return counts

    def _bucket(self, bucket: dist.GradBucket, buf: torch.Tensor) -> BucketRecord:
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
        key = self._key_of.get((bucket.index(), ids))
        if key is not None:
            return self._buckets[key]
        sizes = tuple(p.numel() for p in params)
        if self.packetization == "tensor" and sum(sizes) != buf.numel():
            raise RuntimeError(
                f"bucket {bucket.index()}: parameters hold {sum(sizes)} elements, buffer {buf.numel()}"
            )
        index, numel = bucket.index(), buf.numel()
        known = self.ledger.buckets
        claimed = set(self._key_of.values())
        same = [k for k in known if k[:2] == (index, numel)]
        saved = [k for k in same if k not in claimed and known[k].sizes == sizes]
        key = max(saved) if saved else (index, numel, max((k[2] + 1 for k in same), default=0))
        if self.packetization == "tensor":
            layout = PacketLayout.by_tensor(sizes)
        else:
            layout = PacketLayout.by_mtu(numel, self.mtu, buf.element_size())
        self._key_of[(index, ids)] = key
        packet_numel = None if layout.per_tensor else layout.packet_numel
        self.ledger.register(key, BucketEntry(layout.num_packets, sizes, tuple(ids[1:]), packet_numel))
        keep = self.post.model.keep_fraction(layout.num_packets)
        record = BucketRecord(key, layout, 1.0 / keep if keep > 0 else 0.0, self._saved_stale.pop(key, None))
        self._buckets[key] = record
        return record

    def _stale_buffer(self, record: BucketRecord, like: torch.Tensor) -> torch.Tensor:
        if record.stale is None:
            # A rebuilt bucket with the same index replaces the old one's buffer.
            for other in self._buckets.values():
                if other.key[0] == record.key[0]:
                    other.stale = None
            self._saved_stale = {k: v for k, v in self._saved_stale.items() if k[0] != record.key[0]}
            record.stale = torch.zeros_like(like)
        return record.stale

    @contextlib.contextmanager
    def passthrough(self) -> Iterator[None]:
        """While active the hook is an exact lossless allreduce that draws no random
        numbers and counts nothing. Use it for a warm-up iteration that lets DDP rebuild
        its buckets, so that a fresh run and a resumed one see the same bucket layouts and
        therefore the same loss sequence."""
        previous, self._passthrough = self._passthrough, True
        try:
            yield
        finally:
            self._passthrough = previous

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

    def fidelity(self) -> list[dict[str, float]]:
        """Per finished step since the last call: cosine similarity and relative L2 error of
        the lossy aggregate against the lossless one (``measure_fidelity=True``; see
        :meth:`PacketLedger.fidelity`)."""
        return self.ledger.fidelity(self.steps)

    # -- checkpointing ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the exact loss sequence and its figures: RNG states,
        loss-model memory, stale buffers and the ledger (tensors on CPU;
        ``torch.load(weights_only=True)`` safe). The process group is not included."""
        stale = {k: r.stale for k, r in self._buckets.items() if r.stale is not None} | self._saved_stale
        return {
            "version": STATE_VERSION,
            "config": self.config(),
            "steps": self.steps,
            "worker": self.worker.state_dict(),
            "post": self.post.state_dict(),
            "stale": {key_str(k): v.detach().cpu() for k, v in stale.items()},
            "peers": {str(r): site.state_dict() for r, site in self._peers.items()}
            | {str(r): sd for r, sd in self._saved_peers.items()},
            "counts_transport_resolved": self._counts_resolved,
            "ledger": self.ledger.state_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        mine, theirs = self.config(), sd["config"]
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise ValueError(f"LossyState.load_state_dict: settings differ (saved, now): {diff}")
        self.steps = int(sd["steps"])
        self.worker.load_state_dict(sd["worker"])
        self.post.load_state_dict(sd["post"])
        self._saved_stale = {key_from_str(k): v.clone() for k, v in sd["stale"].items()}
        self._key_of, self._buckets, self._peers = {}, {}, {}
        self._saved_peers = {int(r): p for r, p in sd.get("peers", {}).items()}
        self._counts_resolved = sd.get("counts_transport_resolved", self._counts_resolved)
        ledger = sd["ledger"] if "ledger" in sd else PacketLedger.from_version_2(sd)
        self.ledger.load_state_dict(ledger)
        self.device = None  # re-prepare on the next bucket: generators restored there

    def __getstate__(self) -> dict[str, Any]:
        # Like PowerSGDState: the process group is not serializable and is left out.
        init = {k: v for k, v in self.config().items() if k not in ("loss_model", "loss_rate")}
        return {"init": init, "loss_model": copy.deepcopy(self.loss_model), "state": self.state_dict()}

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__init__(loss_model=d["loss_model"], **d["init"])  # type: ignore[misc]
        self.load_state_dict(d["state"])

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"LossyState({cfg})"

r"""The lossy allreduce communication hook for DDP, and its state.

Usage (PyTorch's PowerSGD convention: a state object plus a hook function)::

    from lossy_hooks import LossyState, lossy_allreduce_hook
    state = LossyState(loss_rate=0.05, mtu=1500, drop_point="worker", fill="rescale")
    ddp_model.register_comm_hook(state, lossy_allreduce_hook)
    ...
    print(state.stats())

The math (``W`` ranks, rank ``r`` holds bucket ``g_r``, split into packets ``j = 0..n-1`` by
:class:`~lossy_hooks.packetization.PacketLayout`; ``a_{r,j} = 1`` when rank ``r``'s copy of
packet ``j`` arrives; ``c_j = sum_r a_{r,j}``; ``s = 1/W`` for ``reduction="mean"``, ``1``
for ``"sum"``):

- lossless (and DDP's own): ``R = sum_r s * g_r``. With loss 0 the hook computes exactly
  this (each rank multiplies by the scalar ``1/W`` before the sum, as DDP's reducer does),
  so results are bitwise equal to DDP without a hook at any ``W``.
- worker drop, ``fill="zero"``: ``R_j = sum_r s * a_{r,j} g_{r,j}`` (a lost copy counts as 0).
- worker drop, ``fill="rescale"``: ``R_j = (W / c_j) * sum_r s * a_{r,j} g_{r,j}`` (``0`` if
  ``c_j = 0``): the mean over the copies that arrived, unbiased given ``c_j > 0``. The counts
  ``c_j`` are summed by one small extra allreduce (``counts_transport="separate"``),
  appended to the bucket in the same allreduce (``"append"``), or computed locally with no
  communication (``"regenerate"``: every rank replays every other rank's mask from that
  rank's ``(seed, rank)`` generator, W times the sampling work); ``"auto"`` (default) picks
  ``"regenerate"`` on CPU with at most 4 ranks, else ``"separate"``
  (:func:`resolve_counts_transport`).
- post drop (after the collective), mask ``b_j = 1`` when packet ``j`` of the result arrives:
  ``"zero"``: ``b_j R_j``; ``"rescale"``: ``b_j R_j / q_n`` with ``q_n`` the loss model's
  expected kept fraction of an ``n``-packet bucket (``LossModel.keep_fraction``: ``1 - p`` for
  random loss, ``(n - floor(p n))/n`` for ``exact``; unbiased: ``E[b_j] = q_n``); ``"stale"``:
  ``R_j`` if ``b_j`` else the last finite value this rank received for packet ``j`` (0 before
  the first; filled by selection, so received packets are never touched).
  ``post_sync="shared"`` draws one mask for all ranks (replicas stay identical);
  ``"independent"`` one per rank (replicas drift).
- ``drop_point="both"``: worker drop, the collective, then post drop; rescale factors multiply.
"""

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .loss_models import Bernoulli, LossModel, check_probability, parse_loss_model
from .packetization import PacketLayout

__all__ = [
    "LossyState",
    "collective_device",
    "derive_seed",
    "lossy_allreduce_hook",
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

# Random streams: one seed per (run seed, stream, rank).
_STREAM_WORKER, _STREAM_POST_SHARED, _STREAM_POST_INDEPENDENT = 1, 2, 3
# Seeds of the start offsets of deterministic models: (seed, stream + this, rank).
_STREAM_START_OFFSET = 100

# (bucket index, numel, generation): one key per distinct content of a bucket. DDP rebuilds
# its buckets after the first iteration; a rebuilt bucket may keep its index and size but hold
# other parameters (or the same ones in another order): it gets the next generation.
BucketKey = tuple[int, int, int]


def derive_seed(seed: int, stream: int, rank: int = 0) -> int:
    """A 63-bit generator seed for ``(seed, stream, rank)`` (numpy's SeedSequence hash)."""
    state = np.random.SeedSequence([int(seed), int(stream), int(rank)]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def _key_str(key: BucketKey) -> str:
    return ":".join(map(str, key))


def _key_from_str(text: str) -> BucketKey:
    parts = [int(x) for x in text.split(":")]
    return parts[0], parts[1], parts[2] if len(parts) > 2 else 0  # "index:numel" before version 2


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


def collective_device(group: Any = None) -> torch.device:
    """The device a collective over ``group`` needs its tensors on: the current CUDA device
    for NCCL, else the CPU (Gloo, MPI)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DropSite:
    """One place where packets are lost (``"worker"`` or ``"post"``): its own copy of the
    loss model, its own generator, and its counters (device tensors, read when asked)."""

    def __init__(self, name: str, model: LossModel, stream: int, per_rank: bool) -> None:
        self.name = name
        self.model = model
        self.lossless = model.is_lossless()
        self.stream = stream
        self.per_rank = per_rank
        self.generator: torch.Generator | None = None
        self._saved_generator: tuple[str, torch.Tensor] | None = None
        self.sent: dict[BucketKey, int] = {}
        self.lost: dict[BucketKey, torch.Tensor] = {}
        self.lost_per_packet: dict[BucketKey, torch.Tensor] = {}
        self.unrecovered: dict[BucketKey, torch.Tensor] = {}

    def prepare(self, device: torch.device, seed: int, rank: int) -> None:
        if self.generator is not None and self.generator.device == device:
            return
        stream_rank = rank if self.per_rank else 0
        gen = torch.Generator(device=device)
        gen.manual_seed(derive_seed(seed, self.stream, stream_rank))
        saved = self._saved_generator
        if self.generator is None and saved is None:  # a fresh stream (not a resume)
            # deterministic models (traces) start at an offset of their own per stream
            self.model.start_stream(derive_seed(seed, self.stream + _STREAM_START_OFFSET, stream_rank))
        if saved is not None:
            if saved[0] == device.type:
                gen.set_state(saved[1])
            else:
                warnings.warn(
                    f"{self.name} drop generator state was saved on {saved[0]!r} and is resumed "
                    f"on {device.type!r}: the loss sequence restarts from the seed",
                    stacklevel=3,
                )
            self._saved_generator = None
        self.generator = gen
        for d in (self.lost, self.unrecovered, self.lost_per_packet):
            for k, v in d.items():
                d[k] = v.to(device)

    def draw(self, key: BucketKey, num_packets: int) -> torch.Tensor | None:
        """The loss mask for this bucket (``None`` when the model is lossless); counts it."""
        self.sent[key] = self.sent.get(key, 0) + num_packets
        if self.lossless:
            return None
        assert self.generator is not None
        lost = self.model.sample(num_packets, self.generator)
        counter = self.lost.get(key)
        if counter is None:
            counter = self.lost[key] = torch.zeros((), dtype=torch.long, device=lost.device)
            self.lost_per_packet[key] = torch.zeros(num_packets, dtype=torch.int32, device=lost.device)
        counter.add_(lost.sum())
        self.lost_per_packet[key].add_(lost)
        return lost

    def unrecovered_counter(self, key: BucketKey, device: torch.device) -> torch.Tensor:
        counter = self.unrecovered.get(key)
        if counter is None:
            counter = self.unrecovered[key] = torch.zeros((), dtype=torch.long, device=device)
        return counter

    def state_dict(self) -> dict[str, Any]:
        if self.generator is not None:
            gen = (self.generator.device.type, self.generator.get_state())
        else:
            gen = self._saved_generator
        return {
            "model": self.model.state_dict(),
            "generator": gen,
            "sent": {_key_str(k): v for k, v in self.sent.items()},
            "lost": {_key_str(k): v.detach().cpu() for k, v in self.lost.items()},
            "unrecovered": {_key_str(k): v.detach().cpu() for k, v in self.unrecovered.items()},
            "lost_per_packet": {_key_str(k): v.detach().cpu() for k, v in self.lost_per_packet.items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd["model"])
        self.generator = None
        gen = sd["generator"]
        # a checkpoint loaded with map_location="cuda" moves the state tensor to the GPU;
        # Generator.set_state takes a CPU ByteTensor
        self._saved_generator = None if gen is None else (str(gen[0]), gen[1].detach().cpu().clone())
        self.sent = {_key_from_str(k): int(v) for k, v in sd["sent"].items()}
        self.lost = {_key_from_str(k): v.clone() for k, v in sd["lost"].items()}
        self.unrecovered = {_key_from_str(k): v.clone() for k, v in sd["unrecovered"].items()}
        self.lost_per_packet = {_key_from_str(k): v.clone() for k, v in sd.get("lost_per_packet", {}).items()}


class LossyState:
    r"""State of :func:`lossy_allreduce_hook`: the configuration, RNGs, loss-model memory,
    statistics and stale-fill buffers. Every argument is checked here (a bad one raises
    ``ValueError`` naming it and the allowed values), except what needs the bucket: that
    ``mtu`` holds at least one element of the bucket's dtype, and that
    ``counts_transport="append"`` can count the group's ranks exactly in that dtype, are
    checked at the first bucket (``ValueError`` from inside the backward pass).

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
        if isinstance(mtu, bool) or not isinstance(mtu, (int, np.integer)) or mtu <= 0:
            raise ValueError(f"mtu must be a positive whole number of bytes, got {mtu!r}")
        self.mtu = int(mtu)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
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

        self.worker = DropSite("worker", loss_model.clone(), _STREAM_WORKER, per_rank=True)
        shared = self.post_sync == "shared"
        stream = _STREAM_POST_SHARED if shared else _STREAM_POST_INDEPENDENT
        self.post = DropSite("post", loss_model.clone(), stream, per_rank=not shared)
        self.steps = 0
        self.rank: int | None = None
        self.world_size: int | None = None
        self.device: torch.device | None = None
        self._layouts: dict[BucketKey, PacketLayout] = {}
        self._key_of: dict[tuple[int, tuple[int, ...]], BucketKey] = {}  # (index, param ids) -> key
        self._sizes: dict[BucketKey, tuple[int, ...]] = {}  # parameter sizes of each key, kept across resumes
        self._post_factor: dict[BucketKey, float] = {}
        self._stale: dict[BucketKey, torch.Tensor] = {}
        self._fidelity: dict[int, list[torch.Tensor]] = {}
        self._passthrough = False
        self._peers: dict[int, DropSite] = {}
        self._bucket_params: dict[BucketKey, list[tuple[int, int]]] = {}
        self._packets: dict[BucketKey, int] = {}  # packets per bucket, kept across resumes
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
    def counts_transport_in_use(self) -> str | None:
        """The counts transport in effect (``"auto"`` resolved at the first bucket; ``None``
        before it)."""
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

    # -- per-bucket helpers used by the hook -------------------------------------------

    def _prepare(self, buf: torch.Tensor, group: Any) -> None:
        if self.device == buf.device:
            return
        self.device = buf.device
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        for site in (self.worker, self.post):
            site.prepare(buf.device, self.seed, self.rank)
        self._stale = {k: v.to(buf.device) for k, v in self._stale.items()}
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
                    site = DropSite(name, self.loss_model.clone(), _STREAM_WORKER, per_rank=True)
                    if peer_rank in self._saved_peers:
                        site.load_state_dict(self._saved_peers.pop(peer_rank))
                    self._peers[peer_rank] = site
                site.prepare(buf.device, self.seed, peer_rank)

    def _regenerated_counts(self, own_lost: torch.Tensor) -> torch.Tensor:
        """``c_j``: this rank's arrivals plus every other rank's, replayed from their generators."""
        counts = (~own_lost).to(torch.int32)
        for site in self._peers.values():
            assert site.generator is not None
            counts += ~site.model.sample(own_lost.numel(), site.generator)
        return counts

    def _layout(self, bucket: dist.GradBucket, buf: torch.Tensor) -> tuple[BucketKey, PacketLayout]:
        """The bucket's key and packet layout.

        Keyed on what the bucket holds: its index and the identities of its parameters, in
        order. DDP rebuilds its buckets after the first iteration, and a rebuilt bucket can
        keep its index and size but hold other parameters, or the same ones in another order:
        it gets a key of its own (the next generation at that index and size), hence its own
        packet layout, loss counters, per-parameter accounting and stale buffer. After
        :meth:`load_state_dict` (a new process: new identities) a bucket takes over the saved
        key of the same index, size and parameter sizes, the most recent generation first."""
        params = bucket.parameters()
        ids = (buf.numel(), *map(id, params))
        key = self._key_of.get((bucket.index(), ids))
        if key is not None:
            return key, self._layouts[key]
        sizes = tuple(p.numel() for p in params)
        if self.packetization == "tensor" and sum(sizes) != buf.numel():
            raise RuntimeError(
                f"bucket {bucket.index()}: parameters hold {sum(sizes)} elements, buffer {buf.numel()}"
            )
        index, numel = bucket.index(), buf.numel()
        claimed = set(self._key_of.values())
        same = [k for k in self._sizes if k[:2] == (index, numel)]
        saved = [k for k in same if k not in claimed and self._sizes[k] == sizes]
        key = max(saved) if saved else (index, numel, max((k[2] + 1 for k in same), default=0))
        if self.packetization == "tensor":
            layout = PacketLayout.by_tensor(sizes)
        else:
            layout = PacketLayout.by_mtu(numel, self.mtu, buf.element_size())
        self._key_of[(index, ids)] = key
        self._layouts[key] = layout
        self._sizes[key] = sizes
        self._packets[key] = layout.num_packets
        self._bucket_params[key] = [(id(p), p.numel()) for p in params]
        keep = self.post.model.keep_fraction(layout.num_packets)
        self._post_factor[key] = 1.0 / keep if keep > 0 else 0.0
        return key, layout

    def _stale_buffer(self, key: BucketKey, like: torch.Tensor) -> torch.Tensor:
        buf = self._stale.get(key)
        if buf is None:
            # A rebuilt bucket with the same index replaces the old one's buffer.
            for old in [k for k in self._stale if k[0] == key[0]]:
                del self._stale[old]
            buf = self._stale[key] = torch.zeros_like(like)
        return buf

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

    # -- statistics ---------------------------------------------------------------------

    def _device_for_collectives(self) -> torch.device:
        """Where statistics tensors live: the buckets' device once one was seen; before that
        (or after :meth:`load_state_dict`) the device the process group's backend needs."""
        if self.device is not None:
            return self.device
        if dist.is_available() and dist.is_initialized():
            return collective_device(self.process_group)
        return torch.device("cpu")

    def stats(self, all_ranks: bool = False) -> dict[str, Any]:
        """Packets sent and lost so far, per drop point and per bucket.

        Counters live on the device and are read here (one host sync). With
        ``all_ranks=True`` they are summed over the process group (a collective: call it on
        every rank, outside the backward pass). For the worker drop point "sent" counts this
        rank's packets to the collective; for post, packets of the result delivered to it.
        ``packets_unrecovered`` (worker rescale) counts packets no rank's copy reached.
        """
        sites = [s for s, on in ((self.worker, self.drops_before), (self.post, self.drops_after)) if on]
        keys = sorted({k for s in sites for k in s.sent})
        device = self._device_for_collectives()
        zero = torch.zeros((), dtype=torch.long, device=device)
        rows: list[torch.Tensor] = []
        for s in sites:
            for k in keys:
                rows.append(torch.tensor(s.sent.get(k, 0), device=device))
                rows.append(s.lost.get(k, zero).to(device))
                rows.append(s.unrecovered.get(k, zero).to(device))
        vec = (
            torch.stack(rows).to(torch.float64)
            if rows
            else torch.zeros(0, dtype=torch.float64, device=device)
        )
        if all_ranks:
            group = self.process_group if self.process_group is not None else dist.group.WORLD
            dist.all_reduce(vec, group=group)
        values = [round(v) for v in vec.tolist()]
        out: dict[str, Any] = {
            "steps": self.steps,
            "world_size": self.world_size,
            "scope": "all ranks" if all_ranks else f"rank {self.rank}",
        }
        buckets: dict[BucketKey, dict[str, Any]] = {
            k: {"index": k[0], "numel": k[1], "generation": k[2], "packets": self._packets.get(k, 0)}
            for k in keys
        }
        it = iter(values)
        for s in sites:
            sent = lost = unrec = 0
            for k in keys:
                bs, bl, bu = next(it), next(it), next(it)
                sent, lost, unrec = sent + bs, lost + bl, unrec + bu
                buckets[k].update({f"{s.name}_sent": bs, f"{s.name}_lost": bl})
            entry = {
                "packets_sent": sent,
                "packets_lost": lost,
                "loss_rate": lost / sent if sent else 0.0,
            }
            if s.name == "worker" and self.fill == "rescale":
                entry["packets_unrecovered"] = unrec
            out[s.name] = entry
        out["buckets"] = list(buckets.values())
        return out

    def loss_by_parameter(self, names: dict[int, str], all_ranks: bool = False) -> list[dict[str, Any]]:
        """Packets sent and lost so far for each parameter's gradient, per drop point.

        ``names`` maps ``id(parameter)`` to its name (``{id(p): n for n, p in
        model.named_parameters()}``). A parameter occupying elements ``[s, e)`` of a bucket
        with ``k`` elements per packet is carried by packets ``s // k`` to ``(e - 1) // k``;
        a packet straddling two parameters counts for both. Summed over the buckets a
        parameter has been in (DDP's first-iteration bucket included). ``all_ranks=True``
        sums over the group (a collective)."""
        sites = [s for s, on in ((self.worker, self.drops_before), (self.post, self.drops_after)) if on]
        keys = sorted(k for k in self._bucket_params if k in self._layouts)
        device = self._device_for_collectives()
        vectors = []
        for site in sites:
            for k in keys:
                n = self._layouts[k].num_packets
                vec = site.lost_per_packet.get(k)
                vectors.append(
                    vec.to(device, torch.int64)
                    if vec is not None
                    else torch.zeros(n, device=device, dtype=torch.int64)
                )
        flat = torch.cat(vectors) if vectors else torch.zeros(0, dtype=torch.int64, device=device)
        if all_ranks and flat.numel():
            group = self.process_group if self.process_group is not None else dist.group.WORLD
            dist.all_reduce(flat, group=group)
        counts = flat.cpu().numpy()
        world = self.world_size or 1
        totals: dict[tuple[str, str], dict[str, Any]] = {}
        offset = 0
        for site in sites:
            for k in keys:
                layout = self._layouts[k]
                per_packet = counts[offset : offset + layout.num_packets]
                offset += layout.num_packets
                cum = np.concatenate([[0], np.cumsum(per_packet)])
                calls = site.sent.get(k, 0) // max(layout.num_packets, 1) * (world if all_ranks else 1)
                start = 0
                for j, (pid, size) in enumerate(self._bucket_params[k]):
                    if layout.per_tensor:
                        first = last = j
                    else:
                        first, last = start // layout.packet_numel, (start + size - 1) // layout.packet_numel
                    start += size
                    label = names.get(pid, f"param@{pid}")
                    row = totals.setdefault(
                        (site.name, label),
                        {
                            "drop_point": site.name,
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

    def bucket_parameter_ids(self) -> dict[BucketKey, list[int]]:
        """``id()`` of the parameters in each bucket seen so far, in buffer order."""
        return {k: [pid for pid, _ in v] for k, v in self._bucket_params.items()}

    def fidelity(self) -> list[dict[str, float]]:
        """Per finished step since the last call: cosine similarity and relative L2 error of
        the lossy aggregate against the lossless one (``measure_fidelity=True``).

        Over all buckets of a step, with ``x`` lossy and ``y`` lossless:
        ``cos = <x, y> / (|x| |y|)`` (1 when both are 0), ``rel_l2 = |x - y| / |y|`` (0 when equal).
        """
        done = sorted(s for s in self._fidelity if s < self.steps)
        out = []
        for step in done:
            parts = torch.stack(self._fidelity.pop(step)).sum(0).tolist()
            dot, xx, yy, dd = parts
            cos = 1.0 if xx == 0 and yy == 0 else dot / math.sqrt(xx * yy) if xx * yy > 0 else 0.0
            rel = 0.0 if dd == 0 else (math.sqrt(dd / yy) if yy > 0 else math.inf)
            out.append({"step": step, "cosine": cos, "rel_l2": rel})
        return out

    # -- checkpointing ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the exact loss sequence: RNG states, loss-model
        memory, counters and stale buffers (tensors on CPU; ``torch.load(weights_only=True)``
        safe). The process group is not included."""
        return {
            "version": 2,
            "config": self.config(),
            "steps": self.steps,
            "worker": self.worker.state_dict(),
            "post": self.post.state_dict(),
            "stale": {_key_str(k): v.detach().cpu() for k, v in self._stale.items()},
            "packets": {_key_str(k): n for k, n in self._packets.items()},
            "sizes": {_key_str(k): list(v) for k, v in self._sizes.items()},
            "peers": {str(r): site.state_dict() for r, site in self._peers.items()}
            | {str(r): sd for r, sd in self._saved_peers.items()},
            "counts_transport_resolved": self._counts_resolved,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        mine, theirs = self.config(), sd["config"]
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise ValueError(f"LossyState.load_state_dict: settings differ (saved, now): {diff}")
        self.steps = int(sd["steps"])
        self.worker.load_state_dict(sd["worker"])
        self.post.load_state_dict(sd["post"])
        self._stale = {_key_from_str(k): v.clone() for k, v in sd["stale"].items()}
        self._packets = {_key_from_str(k): int(n) for k, n in sd.get("packets", {}).items()}
        self._sizes = {_key_from_str(k): tuple(int(x) for x in v) for k, v in sd.get("sizes", {}).items()}
        self._key_of, self._bucket_params, self._post_factor = {}, {}, {}
        self._peers = {}
        self._saved_peers = {int(r): p for r, p in sd.get("peers", {}).items()}
        self._counts_resolved = sd.get("counts_transport_resolved", self._counts_resolved)
        self.device = None  # re-prepare on the next bucket: generators restored there
        self._layouts = {}

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


def _exact_factor(value: float, dtype: torch.dtype) -> bool:
    """Whether ``1/W`` may be folded into the fp32 per-packet factor (then cast to the bucket
    dtype) and still give exactly DDP's arithmetic, ``grad * (1/W)`` with the scalar in the
    op's compute precision: in fp32 always (``x * float32(1/W)`` both ways); in other dtypes
    only for ``W`` a power of two (``1/3`` as an fp32 factor cast to fp64 differs from the fp64
    ``1/3``; cast to bf16 it is ``0.33398``, a bias of ``2^-8`` on every element)."""
    return dtype == torch.float32 or math.frexp(value)[0] == 0.5


def _scale_before_collective(
    buf: torch.Tensor, layout: PacketLayout, pre: torch.Tensor | None, scale: float
) -> None:
    """``buf <- buf * scale * pre[packet]`` in place, in one pass where that is exact: a
    received packet with factor 1 ends up exactly as DDP's ``grad * (1/W)``."""
    if pre is None:
        if scale != 1.0:
            buf.mul_(scale)
    elif _exact_factor(scale, buf.dtype):
        layout.scale_(buf, pre.mul_(scale) if scale != 1.0 else pre)
    else:  # 1/W would round in the factor's cast: multiply by the scalar first, as DDP does
        buf.mul_(scale)
        layout.scale_(buf, pre)


def _arrival_factor(arrivals: torch.Tensor, world: int, unrecovered: torch.Tensor) -> torch.Tensor:
    """Worker rescale: ``W / c_j`` per packet from the arrival counts ``c_j``, and ``0`` where
    no copy arrived (``c_j = 0``), those packets added to the ``unrecovered`` counter."""
    c = arrivals.float()
    unrecovered.add_((c == 0).sum())
    return torch.where(c > 0, world / c.clamp_min(1.0), 0.0)


_FIDELITY_CHUNK = 2**14


def _fidelity_sums(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``[<x, ref>, <x, x>, <ref, ref>, |x - ref|^2]`` in fp64.

    Dot products of fp32 chunks of ``2^14`` elements (``linalg.vecdot``: an elementwise
    product and a cascade sum, no matmul, so TF32 settings do not apply), chunk results
    summed in fp64: relative error ~1e-9 against all-fp64 sums, at a third of their time
    on CPU, without fp64 copies of the bucket."""
    if x.dtype not in (torch.float32, torch.float64):
        x, ref = x.float(), ref.float()
    d = x - ref
    m = x.numel() // _FIDELITY_CHUNK * _FIDELITY_CHUNK
    pairs = ((x, ref), (x, x), (ref, ref), (d, d))
    main = torch.stack(
        [
            torch.linalg.vecdot(a[:m].view(-1, _FIDELITY_CHUNK), b[:m].view(-1, _FIDELITY_CHUNK))
            for a, b in pairs
        ]
    )
    tail = torch.stack([a[m:].double().dot(b[m:].double()) for a, b in pairs])
    return main.double().sum(1) + tail


def _join(
    futures: list[torch.futures.Future],
    on_cuda: bool,
    fn: Callable[[list[torch.Tensor]], torch.Tensor],
    read_in_callback: tuple[torch.Tensor | None, ...] = (),
) -> torch.futures.Future[torch.Tensor]:
    """One future for all collectives the hook launched, then ``fn`` on their results.

    All collectives are launched in the hook body (never from a callback). On CUDA/NCCL the
    work futures complete at enqueue and ``wait()`` only orders streams, so chaining on the
    first (CUDA-aware) future keeps DDP's stream synchronisation; on CPU/Gloo they complete
    on worker threads and ``collect_all`` waits for all of them.

    The stream rule (CUDA): a callback runs on a stream of its own. The futures' values are
    recorded on it by the future itself; every *other* tensor the callback reads that was
    made on the hook's stream (``read_in_callback``: masks, factors, counts, stale buffers,
    counters) is ``record_stream``-ed on the callback's stream before it is read, so the
    caching allocator cannot hand its memory to a new tensor until the callback's kernels
    have run, even after the hook's last reference to it is gone.
    """
    kept = tuple(t for t in read_in_callback if t is not None)

    def protect() -> None:
        stream = torch.cuda.current_stream()
        for t in kept:
            t.record_stream(stream)

    main, rest = futures[0], futures[1:]
    if on_cuda:

        def on_device(f: torch.futures.Future) -> torch.Tensor:
            protect()
            return fn([f.value()[0]] + [x.wait()[0] for x in rest])

        return main.then(on_device)
    if not rest:
        return main.then(lambda f: fn([f.value()[0]]))
    return torch.futures.collect_all(futures).then(lambda f: fn([x.value()[0] for x in f.value()]))


def lossy_allreduce_hook(state: LossyState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    r"""DDP communication hook: packetized, lossy allreduce of ``bucket`` (see module docs).

    Packet masks are drawn on the bucket's device from per-rank generators. Everything known
    before the collective and identical across ranks (the ``1/W`` of a mean, the worker keep
    mask ``a_{r,j}``, ``W/c_j`` under ``counts_transport="regenerate"``, a shared post mask
    and its rescale factor) is one per-packet factor applied to this rank's copy in one pass;
    what needs the collective's result (``W/c_j`` from summed counts, independent post masks,
    stale fill) is applied to the result in one more pass. All collectives are launched
    asynchronously here; the returned future's callbacks only compute.
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buf = bucket.buffer()
    state._prepare(buf, group)
    world = state.world_size
    assert world is not None
    # ``1/W`` as DDP's reducer applies it: a multiply by the scalar (bitwise DDP at any W)
    scale = 1.0 / world if state.reduction == "mean" else 1.0
    if state._passthrough:
        if scale != 1.0:
            buf.mul_(scale)
        return _join(
            [dist.all_reduce(buf, group=group, async_op=True).get_future()], buf.is_cuda, lambda r: r[0]
        )
    key, layout = state._layout(bucket, buf)
    step = state.steps
    if bucket.is_last():
        state.steps += 1

    # Per-packet factors (fp32, one multiply each way): ``pre`` on this rank's copy before the
    # allreduce, ``post`` on the result. Anything known before the collective and the same
    # on every rank goes into ``pre``, so the common cases cost one pass over the bucket.
    clean: torch.Tensor | None = None
    if state.measure_fidelity:  # the lossless reference: the scaled bucket before any loss
        if scale != 1.0:
            buf.mul_(scale)
            scale = 1.0
        clean = buf.clone()
    pre: torch.Tensor | None = None
    post: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    unrecovered: torch.Tensor | None = None
    lost = state.worker.draw(key, layout.num_packets) if state.drops_before else None
    if lost is not None:
        pre = (~lost).float()  # a_{r,j}
        if state.fill == "rescale":
            unrecovered = state.worker.unrecovered_counter(key, buf.device)
            if state._counts_resolved == "regenerate":  # c_j known here: fold W / c_j into pre
                pre.mul_(_arrival_factor(state._regenerated_counts(lost), world, unrecovered))
            else:
                counts = (~lost).to(torch.int32 if state._counts_resolved == "separate" else buf.dtype)

    post_lost = state.post.draw(key, layout.num_packets) if state.drops_after else None
    if post_lost is not None and state.fill != "stale":
        # rescale: 1 / E[fraction of the bucket's packets received] (see LossModel.keep_fraction)
        keep = torch.where(post_lost, 0.0, state._post_factor[key] if state.fill == "rescale" else 1.0)
        if state.post_sync == "shared":  # b_j (R_j) = R_j computed from b_j-scaled copies
            pre = keep if pre is None else pre.mul_(keep)
        else:
            post = keep

    _scale_before_collective(buf, layout, pre, scale)

    appended = counts is not None and state._counts_resolved == "append"
    payload = torch.cat((buf, counts)) if appended else buf  # type: ignore[arg-type]
    futures = [dist.all_reduce(payload, group=group, async_op=True).get_future()]
    if counts is not None and not appended:
        futures.append(dist.all_reduce(counts, group=group, async_op=True).get_future())
    slot: torch.Tensor | None = None
    if clean is not None:
        futures.append(dist.all_reduce(clean, group=group, async_op=True).get_future())
        slot = torch.zeros(4, dtype=torch.float64, device=buf.device)
        state._fidelity.setdefault(step, []).append(slot)

    stale = state._stale_buffer(key, buf) if state.fill == "stale" else None
    numel = layout.numel

    def finish(results: list[torch.Tensor]) -> torch.Tensor:
        out = results[0][:numel] if appended else results[0]
        factor = post
        if counts is not None:
            assert unrecovered is not None
            rescale = _arrival_factor(results[0][numel:] if appended else results[1], world, unrecovered)
            factor = rescale if factor is None else factor.mul_(rescale)
        if factor is not None:
            layout.scale_(out, factor)
        if stale is not None:
            if post_lost is not None:  # select: received packets are never touched
                layout.fill_from_(out, post_lost, stale)
            # the stale value of a packet: its last received, finite value
            layout.fill_from_(stale, layout.finite_packets(out), out)
        if slot is not None:
            slot.copy_(_fidelity_sums(out, results[-1]))
        return out

    return _join(futures, buf.is_cuda, finish, (post, post_lost, counts, stale, slot, clean, unrecovered))

"""Random streams: one generator per ``(seed, stream, rank)``, so every rank draws its own
worker masks, shared post masks are the same on every rank, and a resumed run continues each
sequence where its checkpoint left it.

:class:`Stream` is the one registry of stream ids: every random stream of the package and
the study seeds its generator with ``derive_seed(seed, Stream.X, rank)`` (SeedSequence's
hash of the three numbers), and no two streams share an id (``enum.unique``, and a test that
the start-offset ids ``id + START_OFFSET`` meet no other id), so no two streams draw the
same numbers. Changing an id changes every result drawn from that stream: the ids are
stable."""

from __future__ import annotations

import enum
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lossy_hooks.loss_models import Bernoulli, DeadlineLoss, LossModel

if TYPE_CHECKING:
    from lossy_hooks.core.netclock import SimClock

__all__ = ["OFFSET_STREAMS", "START_OFFSET", "DropSite", "DropSites", "Stream", "derive_seed", "hop_stream"]


@enum.unique
class Stream(enum.IntEnum):
    """Every random stream's id (the middle number of ``derive_seed(seed, stream, rank)``)."""

    DATA = 0  # the study's per-rank data order and augmentation (rank = the rank)
    WORKER = 1  # worker-side loss masks, one per rank
    POST_SHARED = 2  # post-allreduce masks, the same on every rank
    POST_INDEPENDENT = 3  # post-allreduce masks, one per rank
    ROTATION = 4  # the random signs of encoding="hadamard", the same on every rank
    CLOCK = 5  # the simulated clock's delays and drops (netclock), the same on every rank
    HOPS_BROADCAST = 6  # a per-hop placement's broadcast-phase hop losses, the same on every rank
    HOPS_REDUCE = 7  # its reduce-phase hop losses (was 5 until issue 41: the clock's id)
    # the lossy process group's deliveries, one stream per kind, one per receiving rank
    DELIVERY_ALL_GATHER = 8
    DELIVERY_ALL_TO_ALL = 9
    DELIVERY_BROADCAST = 10
    DELIVERY_P2P = 11
    ALL_GATHER = 77  # the study's FSDP all-gather state: its seed is derive_seed(round seed, 77)
    # the study's tensor-parallel traffic state (--tp): its seed is derive_seed(round seed, 78, dp rank)
    TRAFFIC_TP = 78
    # the pipeline (--pp) and expert (--ep) traffic states: derive_seed(round seed, 79 | 80, group)
    TRAFFIC_PP = 79
    TRAFFIC_EP = 80


# Seeds of the start offsets of deterministic models (traces): (seed, stream + this, rank).
START_OFFSET = 100
# streams whose models draw a start offset (DropSite, HopLoss): their id + START_OFFSET
OFFSET_STREAMS = (
    Stream.WORKER,
    Stream.POST_SHARED,
    Stream.POST_INDEPENDENT,
    Stream.HOPS_REDUCE,
    Stream.HOPS_BROADCAST,
    Stream.DELIVERY_ALL_GATHER,
    Stream.DELIVERY_ALL_TO_ALL,
    Stream.DELIVERY_BROADCAST,
    Stream.DELIVERY_P2P,
)


def hop_stream(phase: str) -> Stream:
    """The stream of a per-hop placement's ``phase`` (``"reduce"`` or ``"broadcast"``)."""
    return {"reduce": Stream.HOPS_REDUCE, "broadcast": Stream.HOPS_BROADCAST}[phase]


def derive_seed(seed: int, stream: int, rank: int = 0) -> int:
    """A 63-bit generator seed for ``(seed, stream, rank)`` (numpy's SeedSequence hash)."""
    state = np.random.SeedSequence([int(seed), int(stream), int(rank)]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


class DropSite:
    """One random stream of loss masks: a copy of the loss model (its memory) and the
    generator for ``(seed, stream, rank)``. The worker and post drop points have one each;
    ``counts_transport="regenerate"`` replays one per other rank."""

    def __init__(self, name: str, model: LossModel, stream: int, per_rank: bool) -> None:
        self.name = name
        self.model = model
        self.lossless = model.is_lossless()
        self.stream = stream
        self.per_rank = per_rank
        self.generator: torch.Generator | None = None
        self._saved_generator: tuple[str, torch.Tensor] | None = None

    def prepare(self, device: torch.device, seed: int, rank: int) -> None:
        if self.generator is not None and self.generator.device == device:
            return
        stream_rank = rank if self.per_rank else 0
        gen = torch.Generator(device=device)
        gen.manual_seed(derive_seed(seed, self.stream, stream_rank))
        saved = self._saved_generator
        if self.generator is None and saved is None:  # a fresh stream (not a resume)
            # deterministic models (traces) start at an offset of their own per stream
            self.model.start_stream(derive_seed(seed, self.stream + START_OFFSET, stream_rank))
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

    def draw(self, num_packets: int) -> torch.Tensor | None:
        """The loss mask of ``num_packets`` packets (``None`` when the model is lossless)."""
        if self.lossless:
            return None
        assert self.generator is not None
        return self.model.sample(num_packets, self.generator)

    def state_dict(self) -> dict[str, Any]:
        gen = self._saved_generator
        if self.generator is not None:
            gen = (self.generator.device.type, self.generator.get_state())
        return {"model": self.model.state_dict(), "generator": gen}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd["model"])
        self.generator = None
        gen = sd["generator"]
        # a checkpoint loaded with map_location="cuda" moves the state tensor to the GPU;
        # Generator.set_state takes a CPU ByteTensor
        self._saved_generator = None if gen is None else (str(gen[0]), gen[1].detach().cpu().clone())


class DropSites:
    """The random streams of one :class:`~lossy_hooks.LossyState`: the ``worker`` and ``post``
    drop sites (a shared post mask is one stream from the seed alone, an independent one a
    stream per rank), the Hadamard signs (``rotation``: the same on every rank), and for
    ``counts_transport="regenerate"`` a replay of every other rank's worker stream
    (``peers``, by rank)."""

    def __init__(self, loss_model: LossModel, post_sync: str) -> None:
        self.loss_model = loss_model
        self.worker = DropSite("worker", loss_model.clone(), Stream.WORKER, per_rank=True)
        shared = post_sync == "shared"
        stream = Stream.POST_SHARED if shared else Stream.POST_INDEPENDENT
        self.post = DropSite("post", loss_model.clone(), stream, per_rank=not shared)
        self.rotation = DropSite("rotation", Bernoulli(0.0), Stream.ROTATION, per_rank=False)
        self.peers: dict[int, DropSite] = {}
        self.saved_peers: dict[int, dict[str, Any]] = {}  # restored at the peer's first use

    def prepare(self, device: torch.device, seed: int, rank: int, world: int, replay_peers: bool) -> None:
        """Generators on ``device`` for this rank; with ``replay_peers`` every other rank's
        worker stream too (its saved state restored)."""
        for site in (self.worker, self.post, self.rotation):
            site.prepare(device, seed, rank)
        if not replay_peers:
            return
        for peer_rank in range(world):
            if peer_rank == rank:
                continue
            site = self.peers.get(peer_rank)
            if site is None:
                name = f"worker of rank {peer_rank}"
                site = DropSite(name, self.loss_model.clone(), Stream.WORKER, per_rank=True)
                if peer_rank in self.saved_peers:
                    site.load_state_dict(self.saved_peers.pop(peer_rank))
                self.peers[peer_rank] = site
            site.prepare(device, seed, peer_rank)

    def bind_deadlines(self, clock: SimClock, rank: int) -> None:
        """Deadline loss models read the clock's arrivals: the worker site and every replayed
        peer their own rank's row; the post site its rank's row, or row 0 when shared."""
        post_row = rank if self.post.per_rank else 0
        sites = [(self.worker, rank), (self.post, post_row), *((s, r) for r, s in self.peers.items())]
        for site, row in sites:
            if isinstance(site.model, DeadlineLoss):
                site.model.bind(clock, row)

    def state_dict(self) -> dict[str, Any]:
        peers = {str(r): site.state_dict() for r, site in self.peers.items()}
        return {
            "worker": self.worker.state_dict(),
            "post": self.post.state_dict(),
            "rotation": self.rotation.state_dict(),
            "peers": peers | {str(r): sd for r, sd in self.saved_peers.items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.worker.load_state_dict(sd["worker"])
        self.post.load_state_dict(sd["post"])
        if "rotation" in sd:
            self.rotation.load_state_dict(sd["rotation"])
        self.peers = {}
        self.saved_peers = {int(r): p for r, p in sd.get("peers", {}).items()}

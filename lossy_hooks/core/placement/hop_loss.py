r"""The hop losses of one :class:`~lossy_hooks.LossyState` under a per-hop placement: one
loss model per directed link and phase (its memory: a Gilbert-Elliott burst stays on its
link), one generator per phase shared by all ranks, and the masks of one bucket.

Per lossy phase and collective, every link draws ``S K`` slots (the schedule module) in the
order it carries them: a memoryless Bernoulli model (per-link rates included) in one
``rand((L, S K)) < p_link`` on the bucket's device; models with memory one ``sample`` per
link (their state is per link). Then (:meth:`HopLoss.masks`): the survival of every
``(chunk, rank, slot)`` by pointer doubling, this rank's masks, the arrival counts, the
broadcast rescale factors ``1/q``, and the packets each link lost: all device tensors, no
host sync, no loop over ranks or hops.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lossy_hooks.core.placement.base import Phase
from lossy_hooks.core.placement.hops import HopPlacement
from lossy_hooks.core.placement.links import LinkRules, link_name
from lossy_hooks.core.placement.schedule import Chunking, PhaseShape, path_products
from lossy_hooks.core.streams import START_OFFSET, derive_seed, hop_stream
from lossy_hooks.loss_models import Bernoulli, DeadlineLoss, LossModel

if TYPE_CHECKING:
    from lossy_hooks.core.netclock import SimClock

__all__ = ["HopLoss", "HopMasks"]


@dataclass
class HopMasks:
    """One bucket's masks on one rank (``True`` = lost), ``None`` where nothing is lost.

    ``lost``: this rank's contributions that did not reach their chunk's root; ``post_lost``:
    the result's packets that did not reach this rank; ``arrivals``: ``c_j`` (int32);
    ``post_factor``: ``1 / q[c, rank]`` per packet; ``link_lost``: per phase, packets lost
    per link (int64, the schedule's link order)."""

    lost: torch.Tensor | None = None
    post_lost: torch.Tensor | None = None
    arrivals: torch.Tensor | None = None
    post_factor: torch.Tensor | None = None
    link_lost: dict[Phase, torch.Tensor] = field(default_factory=dict)


class _PhaseStreams:
    """One phase's link models and shared generator."""

    def __init__(self, shape: PhaseShape, models: list[LossModel]) -> None:
        self.shape = shape
        self.models = models
        self.clocked = bool(models) and isinstance(models[0], DeadlineLoss)  # late on the clock
        self.memoryless = all(type(m) is Bernoulli for m in models)
        self.lossless = all(m.is_lossless() for m in models)
        self.generator: torch.Generator | None = None
        self.rates: torch.Tensor | None = None
        self.device: dict[str, torch.Tensor] = {}


class HopLoss:
    """The per-link streams and masks of a per-hop placement (see the module).

    ``phases``: the phases that lose (``drop_point``'s); ``rules``: ``ranks_per_node`` and
    the ``link_loss`` overrides."""

    def __init__(
        self, placement: HopPlacement, loss_model: LossModel, rules: LinkRules, phases: tuple[Phase, ...]
    ) -> None:
        self.placement = placement
        self.loss_model = loss_model
        self.rules = rules
        self.phases = phases
        self.streams: dict[Phase, _PhaseStreams] = {}
        self.world = 0
        self.rank = 0
        self._saved: dict[str, Any] | None = None
        self._chunkings: dict[int, tuple[Chunking, dict[str, Any]]] = {}
        self.clock: SimClock | None = None

    def bind_clock(self, clock: SimClock) -> None:
        """The deadline loss model: every hop's losses are the packets ``clock`` found late
        on that hop (:meth:`SimClock.hop_late`)."""
        self.clock = clock

    @property
    def links(self) -> dict[Phase, tuple[tuple[int, int], ...]]:
        """Per lossy phase, its links (``(src, dst)``) in the order stats report them."""
        return {p: s.shape.links for p, s in self.streams.items()}

    def prepare(self, device: torch.device, seed: int, rank: int, world: int) -> None:
        """Link models and generators for ``world`` ranks on ``device`` (a saved state restored)."""
        self.rank, self.world = rank, world
        shapes = self.placement.shapes(world)
        if not self.streams:
            self.check_links(world)
            for phase in self.phases:
                shape = shapes[phase]
                models = [self.rules.model_for(link, self.loss_model) for link in shape.links]
                for i, m in enumerate(models):  # deterministic models (traces) start per link
                    if type(m).start_stream is not LossModel.start_stream:
                        m.start_stream(derive_seed(seed, hop_stream(phase) + START_OFFSET, i))
                self.streams[phase] = _PhaseStreams(shape, models)
        self._chunkings = {}
        for phase, streams in self.streams.items():
            gen = torch.Generator(device=device)
            gen.manual_seed(derive_seed(seed, hop_stream(phase), 0))
            saved = (self._saved or {}).get(phase)
            if saved is not None:
                for m, sd in zip(streams.models, saved["models"], strict=True):
                    m.load_state_dict(sd)
                if saved["generator"][0] == device.type:
                    gen.set_state(saved["generator"][1])
                else:
                    warnings.warn(
                        f"the {phase} hops' generator was saved on {saved['generator'][0]!r} and is resumed "
                        f"on {device.type!r}: the hop losses restart from the seed",
                        stacklevel=3,
                    )
            elif streams.generator is not None and streams.generator.device.type == device.type:
                gen.set_state(streams.generator.get_state())
            streams.generator = gen
            rates = np.fromiter(
                (m.p if isinstance(m, Bernoulli) else 0.0 for m in streams.models), np.float32
            )
            streams.rates = torch.from_numpy(rates).to(device)[:, None]
            parent, hop = streams.shape.on(device)
            streams.device = {"parent": parent, "hop": hop}
        self._saved = None

    def check_links(self, world: int) -> None:
        """Every ``link_loss`` override names a link of a lossy phase at ``world`` ranks
        (``LinkRules.check``; the study script calls it before any work)."""
        shapes = self.placement.shapes(world)
        used = {link for phase in self.phases for link in shapes[phase].links}
        self.rules.check(world, tuple(sorted(used)), self.placement.name)

    def _chunking(self, packets: int, device: torch.device) -> tuple[Chunking, dict[str, Any]]:
        """A bucket size's chunking and what the masks need of it on ``device`` (cached)."""
        if packets not in self._chunkings:
            chunking = Chunking.of(packets, self.placement.chunk_count(self.world))
            extra: dict[str, Any] = {"slot": chunking.packet_slot.to(device)}
            for phase, streams in self.streams.items():
                valid = chunking.valid(streams.shape)
                extra[f"valid:{phase}"] = torch.from_numpy(valid).to(device)
                links = len(streams.shape.links)
                extra[f"carried:{phase}"] = valid.reshape(links, -1).sum(1) if links else np.zeros(0, int)
            self._chunkings[packets] = (chunking, extra)
        return self._chunkings[packets]

    def carried(self, phase: Phase, packets: int, device: torch.device) -> np.ndarray:
        """Packets each link of ``phase`` carries in one collective of ``packets`` packets."""
        return self._chunking(packets, device)[1][f"carried:{phase}"]

    def draw(self, phase: Phase, packets: int, device: torch.device) -> torch.Tensor:
        """Draw ``phase``'s hops for one collective of ``packets`` packets: the keep table,
        ``(L S + 1, K)`` bool, ``True`` = kept; row ``link S + step`` is that link's
        ``step``-th chunk (the schedule module), the last row (the roots) always kept."""
        streams = self.streams[phase]
        slots = self._chunking(packets, device)[0].slots
        links, steps = len(streams.shape.links), streams.shape.steps
        width = steps * slots
        gen = streams.generator
        assert gen is not None and streams.rates is not None
        if links == 0 or width == 0:
            lost = torch.zeros((links, width), dtype=torch.bool, device=device)
        elif streams.clocked:
            if self.clock is None:
                raise RuntimeError("the deadline loss model needs LossyState(network=NetworkModel(...))")
            lost = self.clock.hop_late(phase, links * steps, slots).view(links, width)
        elif streams.memoryless:
            lost = torch.rand((links, width), generator=gen, device=device) < streams.rates
        else:  # models with memory: one draw per link, in link order
            lost = torch.stack([m.sample(width, gen) for m in streams.models])
        keep = torch.ones((links * steps + 1, slots), dtype=torch.bool, device=device)
        keep[:-1] = ~lost.view(links * steps, slots)
        return keep

    def survival(
        self, phase: Phase, keep: torch.Tensor, packets: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """From a keep table of :meth:`draw`: the ``(C, W, K)`` survival of every rank's
        packets (``True`` = arrived) and the packets each link lost (``(L,)`` int64)."""
        streams = self.streams[phase]
        valid = self._chunking(packets, device)[1][f"valid:{phase}"]
        edge = keep[streams.device["hop"]]  # (C, W, K): each rank's own hop
        alive = path_products(edge, streams.device["parent"], streams.shape.depth)
        lost_slots = keep[:-1].logical_not().logical_and_(valid)
        return alive, lost_slots.view(len(streams.shape.links), -1).sum(1)

    def per_rank(self, alive: torch.Tensor, packets: int, device: torch.device) -> torch.Tensor:
        """A ``(C, W, K)`` survival of :meth:`survival` as ``(W, n)``: rank by packet."""
        slot = self._chunking(packets, device)[1]["slot"]
        chunks, world, slots = alive.shape
        return alive.transpose(0, 1).reshape(world, chunks * slots)[:, slot]

    def path_keep(
        self, phase: Phase, packets: int, device: torch.device, nbytes: float | None = None
    ) -> torch.Tensor:
        """``q[c, r]``: the product of the hop keep fractions on ``r``'s path in ``phase``,
        fp32 ``(C, W)``: each link's ``LossModel.keep_fraction`` of a stream of ``S K`` slots,
        or (the deadline loss model, a bucket of ``nbytes`` bytes) each hop's closed form on
        the clock (:meth:`SimClock.hop_keep_probability`)."""
        streams = self.streams[phase]
        steps, slots = streams.shape.steps, self._chunking(packets, device)[0].slots
        if streams.clocked:
            if self.clock is None or nbytes is None:
                raise RuntimeError("the deadline loss model's keep fractions need the clock and the bytes")
            per_hop = self.clock.hop_keep_probability(phase, packets, nbytes)
        else:
            per_hop = np.repeat([m.keep_fraction(steps * slots) for m in streams.models], steps)
        table = torch.tensor([*per_hop, 1.0], dtype=torch.float32, device=device)
        return path_products(table[streams.device["hop"]], streams.device["parent"], streams.shape.depth)

    def masks(
        self,
        packets: int,
        counts: bool,
        post_rescale: bool,
        device: torch.device,
        nbytes: float | None = None,
    ) -> HopMasks:
        """This rank's masks of one bucket of ``packets`` packets, ``nbytes`` bytes on the
        wire (see :class:`HopMasks`); ``counts``: compute ``c_j``; ``post_rescale``: compute ``1/q``."""
        out = HopMasks()
        chunking, extra = self._chunking(packets, device)
        slot = extra["slot"]
        for phase, streams in self.streams.items():
            if streams.lossless:
                continue
            alive, link_lost = self.survival(phase, self.draw(phase, packets, device), packets, device)
            out.link_lost[phase] = link_lost
            mine = alive[:, self.rank].reshape(-1)[slot].logical_not_()
            if phase == "reduce":
                out.lost = mine
                if counts:
                    out.arrivals = alive.sum(1, dtype=torch.int32).view(-1)[slot]
            else:
                out.post_lost = mine
                if post_rescale:
                    key = f"factor:{phase}:{nbytes if streams.clocked else ''}"
                    if key not in extra:
                        q = self.path_keep(phase, packets, device, nbytes)[:, self.rank]
                        extra[key] = torch.where(q > 0, 1.0 / q, 0.0)[slot // chunking.slots]
                    out.post_factor = extra[key]
        return out

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._saved or {})
        for phase, streams in self.streams.items():
            gen = streams.generator
            out[phase] = {
                "models": [m.state_dict() for m in streams.models],
                "links": [link_name(x) for x in streams.shape.links],
                "generator": None if gen is None else (gen.device.type, gen.get_state()),
            }
        return out

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restored at the next :meth:`prepare` (the world size is known there)."""
        self.streams = {}
        saved = {
            p: {**v, "generator": (str(v["generator"][0]), v["generator"][1].detach().cpu().clone())}
            for p, v in sd.items()
            if v.get("generator") is not None
        }
        self._saved = saved or None

"""Deadline loss: a packet is lost when the simulated network drops it or delivers it after
a deadline (:mod:`lossy_hooks.core.netclock`). The loss pattern comes from the timing: the model
reads the packets its state's :class:`~lossy_hooks.core.netclock.SimClock` found late at this
collective, so the losses, the lossy transport's time and the reliable transport's time all
come from the same arrivals."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lossy_hooks.loss_models.base import LossModel

if TYPE_CHECKING:
    from lossy_hooks.core.netclock import SimClock
    from lossy_hooks.core.options import LossConfig

__all__ = ["ADAPTIVE_SYNTAX", "AdaptiveDeadline", "Deadline", "DeadlineLoss", "parse_deadline"]


@dataclass(frozen=True)
class Deadline:
    """A fixed deadline: ``value`` seconds (absolute), or ``value`` times the loss-free
    collective time ``T_0`` (relative). Text: ``"1.5x"`` or ``"800us"`` / ``"2ms"`` / ``"0.1s"``."""

    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str) -> Deadline:
        t = text.strip().lower()
        units = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
        try:
            if t.endswith("x"):
                out = cls(float(t[:-1]), True)
            else:
                unit = next((u for u in ("us", "ms", "s") if t.endswith(u)), None)
                if unit is None:
                    raise ValueError
                out = cls(float(t[: -len(unit)]) * units[unit], False)
        except ValueError:
            raise ValueError(
                f"deadline must be a multiple of the loss-free collective time ('1.5x') or a time "
                f"('800us', '2ms', '0.1s'), got {text!r}"
            ) from None
        if not (out.value > 0 and math.isfinite(out.value)):
            raise ValueError(f"deadline must be > 0, got {text!r}")
        return out

    def seconds(self, t0: float) -> float:
        return self.value * t0 if self.relative else self.value

    def multiple(self, t0: float) -> float:
        """The deadline as a multiple of ``T_0`` (what a per-hop clock gives each step)."""
        return self.value if self.relative else (self.value / t0 if t0 > 0 else math.inf)

    @property
    def spec(self) -> str:
        return f"{self.value:g}x" if self.relative else f"{self.value * 1e6:g}us"


ADAPTIVE_SYNTAX = "adaptive [median | pNN] [last=K] [cap=Xx]"


@dataclass(frozen=True)
class AdaptiveDeadline:
    r"""A deadline set per collective from the completion times of the ones before it, in
    units of each collective's loss-free time ``T_0`` (so buckets of every size share one
    history). The clock keeps, for the last ``K`` collectives ``k``, every rank's completion
    ratio ``e_{k,r}`` and the collective's ratio ``e_k``, both as if nothing were cut
    (``SimClock.tick`` in :mod:`lossy_hooks.core.netclock`):

    * ``algorithm="ps"``: ``e_{k,r}`` is the arrival of rank ``r``'s last packet over
      ``T_0`` (dropped packets excluded), and ``e_k = max_r e_{k,r}``;
    * a per-hop algorithm (ring, tree, dbtree, direct): ``e_{k,r}`` is the sum, over the
      steps at which ``r`` receives, of its last arrival at that step (dropped packets
      excluded), over the sum of those steps' loss-free times ``tau0_t``; ``e_k`` is the
      collective's uncut time over ``T_0``: the sum, over all steps of both phases, of the
      step's last drawn arrival on any of its hops (a dropped packet's drawn arrival
      included). This is not ``max_r e_{k,r}``: each step's slowest hop may end at a
      different rank, and a rank's ratio is over its own steps only.

    The next deadline is ``x T_0`` with

    * ``median`` (OptiReduce's rule): ``x = min(cap, median_r mean_k e_{k,r})``: each rank's
      estimate is the mean of its last ``K`` ratios; the ranks agree on the median of the
      estimates;
    * ``pNN``: ``x = min(cap, quantile_{NN/100}(e_k))`` over the last ``K`` collectives;

    (medians and quantiles interpolate linearly, as ``numpy.quantile``), and ``x = cap``
    while there is no history. The transport closes early: a collective (a step, per hop)
    ends at its last arrival when nothing is late, else at the deadline.
    Text: ``"adaptive"`` (``median last=8 cap=3x``), ``"adaptive p95 last=16 cap=2x"``."""

    quantile: float | None = None  # None: the median rule; else the percentile rule's q
    last: int = 8
    cap: float = 3.0

    def __post_init__(self) -> None:
        if self.quantile is not None and not (0.0 < self.quantile <= 1.0):
            raise ValueError(f"deadline adaptive pNN: NN must be in (0, 100], got {self.quantile * 100:g}")
        if not (isinstance(self.last, int) and self.last >= 1):
            raise ValueError(f"deadline adaptive last=K: K must be an integer >= 1, got {self.last!r}")
        if not (self.cap > 0 and math.isfinite(self.cap)):
            raise ValueError(f"deadline adaptive cap=Xx: X must be > 0, got {self.cap!r}")

    @classmethod
    def parse(cls, text: str) -> AdaptiveDeadline:
        tokens = text.split()
        if not tokens or tokens[0] != "adaptive":
            raise ValueError(f"an adaptive deadline reads {ADAPTIVE_SYNTAX!r}, got {text!r}")
        quantile, last, cap = None, 8, 3.0
        try:
            for tok in tokens[1:]:
                if tok == "median":
                    quantile = None
                elif tok.startswith("p") and tok[1:].replace(".", "", 1).isdigit():
                    quantile = float(tok[1:]) / 100
                elif tok.startswith("last="):
                    last = int(tok[5:])
                elif tok.startswith("cap=") and tok.endswith("x"):
                    cap = float(tok[4:-1])
                else:
                    raise ValueError
        except ValueError:
            raise ValueError(f"deadline {text!r}: expected {ADAPTIVE_SYNTAX!r}") from None
        return cls(quantile, last, cap)

    def multiple(self, history: torch.Tensor) -> torch.Tensor | float:
        """``x`` from ``history``: ``(k, W + 1)`` float64 ratios of the last ``k <= K``
        collectives (column ``r``: rank ``r``'s ``e_{k,r}``, the last column ``e_k``), on the
        clock's device: no host sync."""
        if history.shape[0] == 0:
            return self.cap
        if self.quantile is None:
            x = torch.quantile(history[:, :-1].mean(0), 0.5)
        else:
            x = torch.quantile(history[:, -1], self.quantile)
        return x.clamp(max=self.cap)

    @property
    def spec(self) -> str:
        rule = "median" if self.quantile is None else f"p{self.quantile * 100:g}"
        return f"adaptive {rule} last={self.last} cap={self.cap:g}x"


def parse_deadline(text: str) -> Deadline | AdaptiveDeadline:
    """``"1.5x"``, ``"800us"`` (:class:`Deadline`) or ``"adaptive ..."`` (:class:`AdaptiveDeadline`)."""
    if text.split()[:1] == ["adaptive"]:
        return AdaptiveDeadline.parse(text)
    return Deadline.parse(text)


class DeadlineLoss(LossModel):
    """``deadline D``: ``D`` a multiple of the loss-free collective time (``1.5x``) or a time
    (``800us``, ``2ms``). Needs ``LossyState(network=NetworkModel(...))``, which binds it to
    the state's clock: rank ``row``'s packets are those of that row of the clock's arrivals."""

    def __init__(self, deadline: str | Deadline | AdaptiveDeadline) -> None:
        self.deadline = parse_deadline(deadline) if isinstance(deadline, str) else deadline
        self.clock: SimClock | None = None
        self.row = 0

    def bind(self, clock: SimClock, row: int) -> None:
        """Draw from ``clock``'s arrivals, row ``row`` (a rank's own packets, or row 0 for a
        mask shared by all ranks)."""
        self.clock, self.row = clock, row

    def sample(self, num_packets: int, generator: torch.Generator) -> torch.Tensor:
        if self.clock is None:
            raise RuntimeError("the deadline loss model needs LossyState(network=NetworkModel(...))")
        return self.clock.lost_row(self.row, num_packets)

    def refuses(self, config: LossConfig) -> str | None:
        if config.network is None:
            return (
                "the deadline loss model needs network=NetworkModel(...) (train_ddp.py: --bandwidth_gbps "
                "and the other network flags): the losses come from the simulated arrival times"
            )
        per_hop = config.placement.per_hop
        if config.drop_point == "both" and not per_hop:
            return (
                "the deadline loss model with algorithm='ps' loses packets of one traversal of the "
                "network: use drop_point='worker' or 'post', not 'both' (a per-hop algorithm, ring, "
                "tree, dbtree or direct, times both phases)"
            )
        for name in ("ranks_per_node", "link_loss"):
            if getattr(config, name) is not None:
                return (
                    f"the deadline loss model does not take {name}: the clock prices every link the "
                    "same (per-link networks are not modelled)"
                )
        adaptive = isinstance(self.deadline, AdaptiveDeadline)
        if adaptive and config.fill == "rescale" and config.drop_point != "worker":
            return (
                "the adaptive deadline with fill='rescale' at drop_point='post' or 'both' is not "
                "supported: the broadcast rescale needs a closed-form keep fraction, which a "
                "deadline set from the history does not have (use fill='zero' or 'stale', or "
                "drop_point='worker', whose rescale counts the arrivals)"
            )
        if config.packetization != "mtu":
            return "the deadline loss model needs packetization='mtu' (the clock prices packets of mtu bytes)"
        if config.protecting:
            return (
                "the deadline loss model with fec, retransmit or protect is not supported: the "
                "deadline transport does not resend (the reliable transport is priced on the same clock)"
            )
        return None

    def long_run_loss_rate(self) -> float:
        """Not one number: the loss probability depends on the bucket's size (its loss-free
        time ``T_0``); see :meth:`bucket_keep_fraction` and the ledger's measured rates."""
        return math.nan

    def keep_fraction(self, num_packets: int) -> float:
        """Not defined by the packet count alone: see :meth:`bucket_keep_fraction`."""
        raise ValueError(
            "the deadline loss model's keep fraction depends on the bucket's bytes: use "
            "bucket_keep_fraction(num_packets, wire_bytes)"
        )

    def bucket_keep_fraction(self, num_packets: int, wire_bytes: float) -> float:
        """``1 -`` the closed-form loss probability of a bucket of ``wire_bytes`` bytes on the
        wire (:meth:`NetworkModel.deadline_loss_probability`): the bytes the clock prices the
        bucket's collective at (its real size: the last packet may be short), not ``n mtu``."""
        if self.clock is None:
            raise RuntimeError("the deadline loss model needs LossyState(network=NetworkModel(...))")
        if not isinstance(self.deadline, Deadline):
            raise ValueError("an adaptive deadline has no closed-form keep fraction")
        nbytes = float(wire_bytes)
        t0 = self.clock.lossfree_seconds(nbytes, num_packets)
        p = self.clock.network.deadline_loss_probability(self.deadline.seconds(t0), t0, self.clock.world)
        return 1.0 - p

    @property
    def spec(self) -> str:
        return f"deadline {self.deadline.spec}"

    def clone(self) -> DeadlineLoss:
        return DeadlineLoss(self.deadline)  # unbound: each copy is bound by its state

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

__all__ = ["DeadlineLoss"]


@dataclass(frozen=True)
class Deadline:
    """A deadline: ``value`` seconds (absolute), or ``value`` times the loss-free collective
    time ``T_0`` (relative). Text: ``"1.5x"`` or ``"800us"`` / ``"2ms"`` / ``"0.1s"``."""

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

    @property
    def spec(self) -> str:
        return f"{self.value:g}x" if self.relative else f"{self.value * 1e6:g}us"


class DeadlineLoss(LossModel):
    """``deadline D``: ``D`` a multiple of the loss-free collective time (``1.5x``) or a time
    (``800us``, ``2ms``). Needs ``LossyState(network=NetworkModel(...))``, which binds it to
    the state's clock: rank ``row``'s packets are those of that row of the clock's arrivals."""

    def __init__(self, deadline: str | Deadline) -> None:
        self.deadline = Deadline.parse(deadline) if isinstance(deadline, str) else deadline
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
        if config.drop_point == "both":
            return (
                "the deadline loss model loses packets of one traversal of the network: use "
                "drop_point='worker' or 'post', not 'both'"
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
        nbytes = float(wire_bytes)
        t0 = self.clock.lossfree_seconds(nbytes)
        p = self.clock.network.deadline_loss_probability(self.deadline.seconds(t0), t0, self.clock.world)
        return 1.0 - p

    @property
    def spec(self) -> str:
        return f"deadline {self.deadline.spec}"

    def clone(self) -> DeadlineLoss:
        return DeadlineLoss(self.deadline)  # unbound: each copy is bound by its state

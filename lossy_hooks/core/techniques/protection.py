r"""What a transport does about a lost packet before the fill, on the loss masks (on the
bucket's device, vectorized, without a host sync): :class:`Protection` applies, for one
bucket of ``n`` data packets at one drop point, in this order:

1. FEC (:mod:`.fec`, ``fec=(g, r)``): ``n + r ceil(n/g)`` packets drawn in wire order, a group
   with at most ``r`` losses rebuilt;
2. protected packets (:mod:`.protect`, ``protect=...``): never lost, never resent;
3. retransmission (:mod:`.retransmit`, ``retransmit=k``) of what is still lost, each try a
   fresh draw of ``n`` packets.

The counters per call, int64 on the device, in :data:`COUNTERS` order: extra packets sent
(parity and resent packets), then each technique's own (data packets recovered by FEC, by
retransmission, by protection, and protected packets sent). Under Bernoulli loss ``p`` the
closed forms compose: a data packet stays lost with probability ``q p^k``, ``q`` FEC's
``p P[Bin(g + r - 1, p) >= r]`` (``p`` without FEC).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lossy_hooks.core.techniques.base import Technique
from lossy_hooks.core.techniques.fec import ForwardErrorCorrection
from lossy_hooks.core.techniques.protect import ProtectedPackets
from lossy_hooks.core.techniques.retransmit import Retransmission
from lossy_hooks.loss_models import Bernoulli

if TYPE_CHECKING:
    from lossy_hooks.core.options import LossConfig

__all__ = ["COUNTERS", "Protection"]

EXTRA = ("extra_packets",)  # parity and resent packets: counted by FEC and retransmission
COUNTERS = (*EXTRA, *ForwardErrorCorrection.counters, *Retransmission.counters, *ProtectedPackets.counters)
_FEC, _RETX, _PROTECT = (
    COUNTERS.index(t.counters[0]) for t in (ForwardErrorCorrection, Retransmission, ProtectedPackets)
)

Draw = Callable[[int], torch.Tensor]


class Protection(Technique):
    """The ``fec`` and ``retransmit`` settings (checked here) and the protected packets,
    applied to a drop point's loss mask in order (:meth:`resolve`, called where the masks
    are drawn: it acts on no tensor of the bucket).

    Args:
        retransmit: tries per lost packet, a whole number >= 0 (0: none).
        fec: ``(g, r)``: ``r >= 1`` parity packets per ``g >= 1`` data packets, or ``None``.
    """

    name = "protection"
    counters = (*EXTRA, "extra_bytes")

    def __init__(self, retransmit: int = 0, fec: tuple[int, int] | None = None) -> None:
        self.retransmission = Retransmission(retransmit)
        self.code = ForwardErrorCorrection.of(fec)
        self.retransmit = self.retransmission.tries
        self.fec = None if self.code is None else (self.code.g, self.code.r)

    @classmethod
    def used_by(cls, config: LossConfig) -> bool:
        return config.protecting

    @classmethod
    def refuses(cls, config: LossConfig) -> str | None:
        post_rescale = config.fill == "rescale" and config.drops_after
        if post_rescale and config.protection.active and not isinstance(config.loss_model, Bernoulli):
            return (
                "fill='rescale' after the allreduce with fec or retransmit needs loss_rate / a Bernoulli "
                f"model (the kept fraction has a closed form only there); got {config.loss_model.spec!r}"
            )
        return None

    @property
    def active(self) -> bool:
        return self.retransmit > 0 or self.fec is not None

    def parity_packets(self, n: int) -> int:
        """Parity packets sent with ``n`` data packets: ``r * ceil(n / g)``."""
        return 0 if self.code is None else self.code.parity_packets(n)

    def resolve(
        self, n: int, draw: Draw, protected: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss mask of the ``n`` data packets after FEC, protection and retransmission
        (drawing from ``draw(count)``), and the :data:`COUNTERS` of this call."""
        counters = torch.zeros(len(COUNTERS), dtype=torch.int64, device=device)
        extra = counters[0:1]
        if self.code is not None:
            lost = self.code.recover(n, draw, extra, counters[_FEC : _FEC + 1])
        else:
            lost = draw(n)
        if protected is not None:  # sent reliably: never lost, never resent
            lost = ProtectedPackets.recover(lost, protected, counters[_PROTECT : _PROTECT + 2])
        lost = self.retransmission.recover(lost, n, draw, extra, counters[_RETX : _RETX + 1])
        return lost, counters

    def bernoulli_loss(self, p: float, group: int | None = None) -> float:
        """The probability that a data packet stays lost under Bernoulli loss ``p`` after FEC
        (in a group of ``group`` data packets, ``g`` by default) and retransmission."""
        q = p if self.code is None else self.code.bernoulli_loss(p, group)
        return self.retransmission.bernoulli_loss(q, p)

    def bernoulli_keep(self, p: float, n: int) -> torch.Tensor:
        """Per data packet of an ``n``-packet bucket, the probability it arrives (fp64, CPU):
        the post-drop rescale divides by it."""
        keep = torch.full((n,), 1.0 - self.bernoulli_loss(p), dtype=torch.float64)
        if self.code is not None and n % self.code.g:
            t = n % self.code.g
            keep[n - t :] = 1.0 - self.bernoulli_loss(p, t)
        return keep

    def spec(self) -> str:
        parts = [t.spec() for t in (self.code, self.retransmission) if t is not None]
        return "-".join(part for part in parts if part)

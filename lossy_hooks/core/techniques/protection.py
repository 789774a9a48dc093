r"""What a transport does about a lost packet before the fill: forward error correction,
retransmission, and packets that are never lost. All of it works on loss masks, on the
bucket's device, vectorized, without a host sync.

For one bucket of ``n`` data packets at one drop point, in this order (FEC, then protection,
then retransmission of what is still lost):

1. **FEC** ``(g, r)``: the data packets go in groups of ``g`` (the last one holds the
   remaining ``t = n - g * floor(n / g)`` if ``t > 0``), each followed by ``r`` parity packets,
   so ``n + r * ceil(n / g)`` packets are drawn from the loss model in that wire order
   (parity packets are lost like any other). An MDS code rebuilds a group from any ``g`` of
   its packets: a group with at most ``r`` losses (data and parity together) loses nothing;
   a group with more keeps its lost data packets lost. Only the recoverability is simulated:
   the code itself is not computed. For Bernoulli loss ``p`` a data packet of a full group is
   lost with probability ``p * P[Bin(g + r - 1, p) >= r]``.
2. **Protected packets** (``LossyState(protect=...)``): packets that carry any element of a
   protected parameter travel reliably: never lost, never resent, still counted as sent.
3. **Retransmission** ``k``: each data packet still lost is sent again, up to ``k`` times;
   each try draws a fresh mask of ``n`` packets from the loss model (a Markov chain goes on
   through the tries) and a packet is recovered by its first try that arrives. Bernoulli:
   lost with probability ``p^(k + 1)``; the expected number of resent packets per data
   packet is ``p + p^2 + ... + p^k``.

The counters per call, int64 on the device, in :data:`COUNTERS` order: extra packets sent
(parity and resent packets), data packets recovered by FEC, by retransmission, by
protection, and protected packets sent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lossy_hooks.core.techniques.base import Technique
from lossy_hooks.loss_models import Bernoulli

if TYPE_CHECKING:
    from lossy_hooks.core.options import LossConfig

__all__ = ["COUNTERS", "ProtectRule", "Protection", "protect_rule"]

COUNTERS = (
    "extra_packets",
    "recovered_fec",
    "recovered_retransmit",
    "recovered_protect",
    "protected_packets",
)

Draw = Callable[[int], torch.Tensor]
ProtectRule = Callable[[str, torch.Tensor], bool]


def protect_rule(protect: str | ProtectRule | None) -> ProtectRule | None:
    """``protect`` as a predicate ``(parameter name, parameter) -> bool``: a regular
    expression is searched in the name (``"bias|norm|bn"``); a callable is used as it is."""
    if protect is None or callable(protect):
        return protect
    if not isinstance(protect, str) or not protect:
        raise ValueError(
            f"protect must be a name pattern (regular expression) or a predicate, got {protect!r}"
        )
    try:
        pattern = re.compile(protect)
    except re.error as e:
        raise ValueError(f"protect: {protect!r} is not a regular expression ({e})") from None
    return lambda name, _param: pattern.search(name) is not None


class Protection(Technique):
    """Forward error correction and retransmission settings (checked here), and the
    technique that applies them and the protected packets to a drop point's loss mask
    (:meth:`resolve`, called where the masks are drawn: it acts on no tensor of the bucket).

    Args:
        retransmit: tries per lost packet, a whole number >= 0 (0: none).
        fec: ``(g, r)``: ``r >= 1`` parity packets per ``g >= 1`` data packets, or ``None``.
    """

    def __init__(self, retransmit: int = 0, fec: tuple[int, int] | None = None) -> None:
        if isinstance(retransmit, bool) or not isinstance(retransmit, int) or retransmit < 0:
            raise ValueError(f"retransmit must be a whole number of tries >= 0, got {retransmit!r}")
        if fec is not None:
            ok = isinstance(fec, (tuple, list)) and len(fec) == 2
            ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in fec)
            if not ok or fec[0] < 1 or fec[1] < 1:
                raise ValueError(
                    f"fec must be (g, r): g >= 1 data and r >= 1 parity packets per group, got {fec!r}"
                )
            fec = (int(fec[0]), int(fec[1]))
        self.retransmit = int(retransmit)
        self.fec = fec

    name = "protection"
    counters = (*COUNTERS, "extra_bytes")

    @classmethod
    def used_by(cls, config: LossConfig) -> bool:
        return config.protection.active or config.protect is not None

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
        return 0 if self.fec is None else self.fec[1] * -(-n // self.fec[0])

    def resolve(
        self, n: int, draw: Draw, protected: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss mask of the ``n`` data packets after FEC, retransmission and protection
        (drawing from ``draw(count)``), and the :data:`COUNTERS` of this call."""
        counters = torch.zeros(len(COUNTERS), dtype=torch.int64, device=device)
        if self.fec is not None:
            wire = draw(n + self.parity_packets(n))
            drawn = self._data_of(wire, n)
            lost = self._after_fec(wire, n)
            counters[0] += self.parity_packets(n)
            counters[1] += (drawn & ~lost).sum()
        else:
            lost = draw(n)
        if protected is not None:  # sent reliably: never lost, never resent
            counters[3] += (lost & protected).sum()
            counters[4] += protected.sum()
            lost = lost & ~protected
        before = lost
        for _ in range(self.retransmit):
            counters[0] += lost.sum()
            lost = lost & draw(n)
        counters[2] += (before & ~lost).sum()
        return lost, counters

    def _data_of(self, wire: torch.Tensor, n: int) -> torch.Tensor:
        """The data packets' entries of a wire-order mask (parity left out)."""
        assert self.fec is not None
        g, r = self.fec
        full = n // g
        head = wire[: full * (g + r)].view(full, g + r)[:, :g].reshape(-1)
        return torch.cat((head, wire[full * (g + r) : full * (g + r) + n - full * g]))

    def _after_fec(self, wire: torch.Tensor, n: int) -> torch.Tensor:
        """Data packets still lost: those of groups with more than ``r`` losses."""
        assert self.fec is not None
        g, r = self.fec
        full = n // g
        groups = wire[: full * (g + r)].view(full, g + r)
        parts = [(groups[:, :g] & (groups.sum(1, keepdim=True) > r)).reshape(-1)]
        if n > full * g:  # the last, shorter group: t data packets and r parity
            last = wire[full * (g + r) :]
            parts.append(last[: n - full * g] & (last.sum() > r))
        return torch.cat(parts)

    def bernoulli_loss(self, p: float, group: int | None = None) -> float:
        """The probability that a data packet stays lost under Bernoulli loss ``p`` after FEC
        (in a group of ``group`` data packets, ``g`` by default) and retransmission."""
        q = p
        if self.fec is not None:
            r = self.fec[1]
            others = (self.fec[0] if group is None else group) + r - 1  # the group fails: >= r other losses
            q = p * sum(math.comb(others, i) * p**i * (1 - p) ** (others - i) for i in range(r, others + 1))
        return q * p**self.retransmit

    def bernoulli_keep(self, p: float, n: int) -> torch.Tensor:
        """Per data packet of an ``n``-packet bucket, the probability it arrives (fp64, CPU):
        the post-drop rescale divides by it."""
        keep = torch.full((n,), 1.0 - self.bernoulli_loss(p), dtype=torch.float64)
        if self.fec is not None and n % self.fec[0]:
            t = n % self.fec[0]
            keep[n - t :] = 1.0 - self.bernoulli_loss(p, t)
        return keep

    def spec(self) -> str:
        parts = []
        if self.fec is not None:
            parts.append(f"fec{self.fec[0]}-{self.fec[1]}")
        if self.retransmit:
            parts.append(f"retx{self.retransmit}")
        return "-".join(parts)

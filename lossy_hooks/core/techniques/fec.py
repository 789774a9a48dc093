r"""``fec=(g, r)``: forward error correction on the loss masks.

The data packets go in groups of ``g`` (the last one holds the remaining
``t = n - g * floor(n / g)`` if ``t > 0``), each followed by ``r`` parity packets, so
``n + r * ceil(n / g)`` packets are drawn from the loss model in that wire order (parity
packets are lost like any other). An MDS code rebuilds a group from any ``g`` of its packets:
a group with at most ``r`` losses (data and parity together) loses nothing; a group with more
keeps its lost data packets lost. Only the recoverability is simulated: the code itself is
not computed. For Bernoulli loss ``p`` a data packet of a group of ``g`` is lost with
probability ``p * P[Bin(g + r - 1, p) >= r]`` (:meth:`ForwardErrorCorrection.bernoulli_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from lossy_hooks.core.techniques.base import Technique

if TYPE_CHECKING:
    from lossy_hooks.core.options import LossConfig

__all__ = ["ForwardErrorCorrection"]


class ForwardErrorCorrection(Technique):
    """An ``(g, r)`` MDS code over groups of ``g`` data packets (see the module); applied by
    :class:`~lossy_hooks.core.techniques.protection.Protection`, first."""

    name = "fec"
    counters = ("recovered_fec",)

    def __init__(self, g: int, r: int) -> None:
        self.g, self.r = g, r

    @classmethod
    def of(cls, fec: Any) -> ForwardErrorCorrection | None:
        """The code of the ``fec`` setting (``(g, r)`` or ``None``), checked."""
        if fec is None:
            return None
        ok = isinstance(fec, (tuple, list)) and len(fec) == 2
        ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in fec)
        if not ok or fec[0] < 1 or fec[1] < 1:
            raise ValueError(
                f"fec must be (g, r): g >= 1 data and r >= 1 parity packets per group, got {fec!r}"
            )
        return cls(int(fec[0]), int(fec[1]))

    @classmethod
    def used_by(cls, config: LossConfig) -> bool:
        return config.fec is not None

    def parity_packets(self, n: int) -> int:
        """Parity packets sent with ``n`` data packets: ``r * ceil(n / g)``."""
        return self.r * -(-n // self.g)

    def recover(
        self, n: int, draw: Callable[[int], torch.Tensor], extra: torch.Tensor, recovered: torch.Tensor
    ) -> torch.Tensor:
        """The loss mask of the ``n`` data packets after the code, from one draw in wire order;
        the parity packets added to ``extra``, the data packets it rebuilt to ``recovered``."""
        wire = draw(n + self.parity_packets(n))
        drawn = self._data_of(wire, n)
        lost = self._after_fec(wire, n)
        extra += self.parity_packets(n)
        recovered += (drawn & ~lost).sum()
        return lost

    def _data_of(self, wire: torch.Tensor, n: int) -> torch.Tensor:
        """The data packets' entries of a wire-order mask (parity left out)."""
        g, r = self.g, self.r
        full = n // g
        head = wire[: full * (g + r)].view(full, g + r)[:, :g].reshape(-1)
        return torch.cat((head, wire[full * (g + r) : full * (g + r) + n - full * g]))

    def _after_fec(self, wire: torch.Tensor, n: int) -> torch.Tensor:
        """Data packets still lost: those of groups with more than ``r`` losses."""
        g, r = self.g, self.r
        full = n // g
        groups = wire[: full * (g + r)].view(full, g + r)
        parts = [(groups[:, :g] & (groups.sum(1, keepdim=True) > r)).reshape(-1)]
        if n > full * g:  # the last, shorter group: t data packets and r parity
            last = wire[full * (g + r) :]
            parts.append(last[: n - full * g] & (last.sum() > r))
        return torch.cat(parts)

    def bernoulli_loss(self, p: float, group: int | None = None) -> float:
        """The probability that a data packet of a group of ``group`` data packets (``g`` by
        default) stays lost under Bernoulli loss ``p``: ``p P[Bin(group + r - 1, p) >= r]``."""
        others = (self.g if group is None else group) + self.r - 1  # the group fails: >= r other losses
        return p * sum(
            math.comb(others, i) * p**i * (1 - p) ** (others - i) for i in range(self.r, others + 1)
        )

    def spec(self) -> str:
        return f"fec{self.g}-{self.r}"

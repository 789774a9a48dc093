r"""``retransmit=k``: each data packet still lost is sent again, up to ``k`` times.

Each try draws a fresh mask of ``n`` packets from the loss model (a Markov chain goes on
through the tries) and a packet is recovered by its first try that arrives. Bernoulli: a
packet lost with probability ``q`` before the tries (``p`` without FEC) stays lost with
probability ``q p^k``; the expected number of resent packets per data packet is
``p + p^2 + ... + p^k`` without FEC.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from lossy_hooks.core.techniques.base import Technique

if TYPE_CHECKING:
    from lossy_hooks.core.options import LossConfig

__all__ = ["Retransmission"]


class Retransmission(Technique):
    """Up to ``tries`` resends of each lost data packet (see the module); applied by
    :class:`~lossy_hooks.core.techniques.protection.Protection`, last."""

    name = "retransmit"
    counters = ("recovered_retransmit",)

    def __init__(self, tries: Any = 0) -> None:
        if isinstance(tries, bool) or not isinstance(tries, int) or tries < 0:
            raise ValueError(f"retransmit must be a whole number of tries >= 0, got {tries!r}")
        self.tries = int(tries)

    @classmethod
    def used_by(cls, config: LossConfig) -> bool:
        return config.retransmit > 0

    def recover(
        self,
        lost: torch.Tensor,
        n: int,
        draw: Callable[[int], torch.Tensor],
        extra: torch.Tensor,
        recovered: torch.Tensor,
    ) -> torch.Tensor:
        """``lost`` after the tries; the resent packets added to ``extra``, the packets a try
        delivered to ``recovered``."""
        before = lost
        for _ in range(self.tries):
            extra += lost.sum()
            lost = lost & draw(n)
        recovered += (before & ~lost).sum()
        return lost

    def bernoulli_loss(self, q: float, p: float) -> float:
        """A packet lost with probability ``q`` before the tries stays lost: ``q p^k``."""
        return q * p**self.tries

    def spec(self) -> str:
        return f"retx{self.tries}" if self.tries else ""

r"""``protect=...``: parameters whose packets travel reliably (never lost, never resent, still
counted as sent). A regular expression is searched in the parameter's name, or a predicate
``(name, parameter) -> bool`` decides; a packet is protected when it carries any element of a
protected parameter (with an encoding: when its block holds one, since a lost coefficient
changes every element of its block).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lossy_hooks.core.packetization import PacketLayout
from lossy_hooks.core.techniques.base import Technique
from lossy_hooks.core.techniques.hadamard import carrying_packets

if TYPE_CHECKING:
    from lossy_hooks.core.options import LossConfig

__all__ = ["ProtectRule", "ProtectedPackets", "protect_rule", "protected_packets"]

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


def protected_packets(
    rule: ProtectRule,
    names: dict[int, str],
    layout: PacketLayout,
    params: list[torch.Tensor],
    edges: tuple[int, ...] = (),
) -> torch.Tensor:
    """The packets of a bucket of ``params`` (in buffer order) that carry an element of a
    parameter ``rule`` selects (with an encoding's block ``edges``: every packet of a block
    holding one), as a bool CPU tensor; ``names`` maps ``id(param)`` to its name."""
    out = torch.zeros(layout.num_packets, dtype=torch.bool)
    start = 0
    for j, p in enumerate(params):
        size = p.numel()
        if rule(names.get(id(p), ""), p):
            if layout.per_tensor:
                out[j] = True
            else:
                k, n = layout.packet_numel, layout.num_packets
                first, last = carrying_packets(start, start + size, k, n, edges)
                out[first : last + 1] = True
        start += size
    return out


class ProtectedPackets(Technique):
    """Protected packets on a drop point's loss mask (see the module); applied by
    :class:`~lossy_hooks.core.techniques.protection.Protection` after FEC, before
    retransmission."""

    name = "protect"
    counters = ("recovered_protect", "protected_packets")

    @classmethod
    def used_by(cls, config: LossConfig) -> bool:
        return config.protect is not None

    @staticmethod
    def recover(lost: torch.Tensor, protected: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
        """``lost`` without the protected packets; ``counters`` (this technique's two) get
        the protected packets that would have been lost, and all protected packets."""
        counters[0] += (lost & protected).sum()
        counters[1] += protected.sum()
        lost = lost & ~protected
        return lost

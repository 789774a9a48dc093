"""The techniques: each one module behind :class:`~lossy_hooks.core.techniques.base.Technique`
(what it does before the wire, after the collective, what it counts, what it refuses), and
the registration that orders them. Adding a technique: its module, and one entry here.

- :mod:`.fills`: ``zero``, ``rescale``, ``stale`` (:data:`FILLS`, chosen by ``fill=``);
- :mod:`.fidelity`: ``measure_fidelity`` (the lossless reference);
- :mod:`.error_feedback`: ``error_feedback`` (a worker resends what its uplink lost);
- :mod:`.hadamard`: ``encoding="hadamard"`` (the randomized rotation);
- :mod:`.wire_dtype`: ``wire_dtype`` (what dtype travels);
- :mod:`.fec`, :mod:`.protect`, :mod:`.retransmit`: ``fec``, ``protect``, ``retransmit`` (a
  transport's recovery, on the loss masks), applied in that order by :mod:`.protection`
  (:meth:`Protection.resolve`, where the masks are drawn).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from lossy_hooks.core.techniques.base import BucketCall, Technique
from lossy_hooks.core.techniques.error_feedback import ErrorFeedback
from lossy_hooks.core.techniques.fec import ForwardErrorCorrection
from lossy_hooks.core.techniques.fidelity import MeasureFidelity
from lossy_hooks.core.techniques.fills import Fill, RescaleFill, StaleFill, ZeroFill
from lossy_hooks.core.techniques.hadamard import HadamardEncoding
from lossy_hooks.core.techniques.protect import ProtectedPackets
from lossy_hooks.core.techniques.protection import Protection
from lossy_hooks.core.techniques.retransmit import Retransmission
from lossy_hooks.core.techniques.wire_dtype import WireDtype

if TYPE_CHECKING:
    from lossy_hooks.core.options import LossConfig

__all__ = [
    "CHAIN",
    "FILLS",
    "TECHNIQUES",
    "BucketCall",
    "Fill",
    "Protection",
    "Technique",
    "fill_of",
    "refusals",
    "wire_chain",
]

FILLS: dict[str, type[Fill]] = {cls.name: cls for cls in (ZeroFill, RescaleFill, StaleFill)}

# The DDP hook's chain, in order before the wire (reversed after the collective); ``Fill``
# stands for the configuration's fill: the loss is applied there, after the reference and
# the residuals are taken and the bucket rotated, before the cast to the wire dtype.
CHAIN: tuple[type[Technique], ...] = (MeasureFidelity, ErrorFeedback, HadamardEncoding, Fill, WireDtype)

# every technique, in the order their refusals are checked
TECHNIQUES: tuple[type[Technique], ...] = (
    *FILLS.values(),
    MeasureFidelity,
    HadamardEncoding,
    ErrorFeedback,
    WireDtype,
    ForwardErrorCorrection,
    ProtectedPackets,
    Retransmission,
    Protection,
)


def fill_of(config: LossConfig) -> Fill:
    """The fill ``config.fill`` names."""
    return FILLS[config.fill](config)


def wire_chain(config: LossConfig, fill: Fill) -> tuple[Technique, ...]:
    """The techniques ``config`` uses on a DDP bucket, in chain order (:data:`CHAIN`)."""
    return tuple(fill if cls is Fill else cls(config) for cls in CHAIN if cls is Fill or cls.used_by(config))


def refusals(config: LossConfig) -> Iterator[str]:
    """The reasons the techniques ``config`` uses refuse it, in :data:`TECHNIQUES` order."""
    for cls in TECHNIQUES:
        if cls.used_by(config):
            reason = cls.refuses(config)
            if reason is not None:
                yield reason

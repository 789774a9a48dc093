r"""OptiReduce's transpose exchange: every rank sends its part of chunk ``c`` straight to
``c``'s owner, and the owner sends the result straight back.

The bucket is split into ``W`` chunks, chunk ``c`` owned by rank ``c``. Reduce phase: link
``r -> c`` carries rank ``r``'s part of chunk ``c`` (one hop: kept with probability
``1 - p``); the owner's own part never crosses the network, so the delivered fraction is
``1 - p (W - 1) / W``. Broadcast phase: link ``c -> r`` carries the result of chunk ``c``
(``1 - p`` for every rank but the owner). ``W (W - 1)`` links, one chunk each per phase.
"""

from __future__ import annotations

import numpy as np

from lossy_hooks.core.placement.base import Phase
from lossy_hooks.core.placement.hops import HopPlacement

__all__ = ["Direct"]


class Direct(HopPlacement):
    """``algorithm="direct"`` (see the module)."""

    name = "direct"
    shards = True  # chunk c = the row FSDP's rank c owns

    def chunk_count(self, world: int) -> int:
        return world

    def trees(self, world: int) -> dict[Phase, tuple[np.ndarray, np.ndarray]]:
        owner = np.broadcast_to(np.arange(world)[:, None], (world, world)).copy()
        order = np.zeros((world, world), dtype=np.int64)
        return {"reduce": (owner, order), "broadcast": (owner.copy(), order)}

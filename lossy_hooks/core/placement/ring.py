r"""NCCL's ring: a reduce-scatter then an all-gather, ``W - 1`` steps each, on the links
``r -> r + 1 (mod W)``.

The bucket is split into ``W`` chunks; chunk ``c`` is reduced at rank ``c``.

* **Reduce-scatter**, step ``s = 0 .. W-2``: rank ``r`` sends its partial sum of chunk
  ``(r - s - 1) mod W`` to ``r + 1``, which adds its own contribution. Chunk ``c`` starts at
  rank ``c + 1`` and reaches ``c`` after ``W - 1`` hops, so the contribution of the rank ``d``
  hops upstream of the owner (``c - d``) crosses ``d`` hops and survives i.i.d. per-hop loss
  ``p`` with probability ``(1 - p)^d``; the mean delivered fraction of contributions is
  ``(1/W) sum_{d=0}^{W-1} (1-p)^d = (1 - (1-p)^W) / (W p)``.
* **All-gather**, step ``s``: rank ``r`` sends chunk ``(r - s) mod W`` (its own at ``s = 0``,
  then the one it received) to ``r + 1``. Rank ``c + k`` receives chunk ``c`` after ``k``
  hops, with probability ``(1 - p)^k``; a miss is missing at every rank downstream too.

Each link carries ``W - 1`` chunks per phase, in step order.
"""

from __future__ import annotations

import numpy as np

from lossy_hooks.core.placement.base import Phase
from lossy_hooks.core.placement.hops import HopPlacement

__all__ = ["Ring"]


class Ring(HopPlacement):
    """``algorithm="ring"`` (see the module); priced per step (the timing module)."""

    name = "ring"
    shards = True  # chunk c = the row FSDP's rank c owns

    def chunk_count(self, world: int) -> int:
        return world

    def trees(self, world: int) -> dict[Phase, tuple[np.ndarray, np.ndarray]]:
        c = np.arange(world)[:, None]
        r = np.arange(world)[None, :]
        owner = r == c
        return {
            "reduce": (np.where(owner, c, (r + 1) % world), (r - c - 1) % world),
            "broadcast": (np.where(owner, c, (r - 1) % world), (r - 1 - c) % world),
        }

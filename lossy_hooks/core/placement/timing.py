r"""What each hop of a per-hop placement costs on the simulated network: the synchronous steps
of a phase, each hop's loss-free duration, each step's loss-free time.

**The rule** (store and forward, bulk synchronous; ``alpha`` the per-message latency,
``beta`` the link bandwidth, :class:`~lossy_hooks.core.network.NetworkModel`):

* a phase runs in steps ``t = 0 .. T-1``; the hop of ``(chunk c, rank r)`` runs at the step
  of its *level* (:attr:`PhaseShape.hop_level`): towards the root a rank forwards a chunk's
  partial sum once all its children's are in (its height in the chunk's tree), away from it
  one step after its parent received (``depth - 1``). On a ring this is NCCL's step
  ``s = 0 .. W-2`` of each half; a direct exchange is one step per phase; a binary tree has
  ``depth`` steps per phase. Chunks are not pipelined inside a step (a tree level sends its
  whole chunk before the next level starts: an upper bound of NCCL's pipelined tree,
  ``2 (depth alpha + k B / beta)`` against ours ``2 sum_t (alpha + k_t B / beta)``);
* step ``t`` starts when step ``t - 1`` has ended on every link; its flows share the ports
  fairly: hop ``h`` (link ``src -> dst``, ``m_h`` packets of ``b`` bytes) gets
  ``beta / k_h``, ``k_h = max(out_t(src), in_t(dst))`` the most flows its sender sends or its
  receiver takes at that step (incast: a direct exchange's owner takes ``W - 1`` senders at
  once, each at ``beta / (W - 1)``), so it lasts ``D_h = alpha + k_h m_h b / beta``;
* loss free, step ``t`` ends with its slowest hop: ``tau0_t = max_{h at t} D_h``, and the
  phase takes ``T_0 = sum_t tau0_t``.

Closed forms (``n`` packets, chunks of ``ceil(n/W)`` packets at most): a ring
``2 (W - 1) (alpha + ceil(n/W) b / beta)`` (the ``ps`` price ``2 (W-1) (alpha + B/(W beta))``
when ``W`` divides ``n``); a direct exchange ``2 (alpha + (W - 1) ceil(n/W) b / beta)``.

The clock's random part (jitter, stragglers, drops, the deadline) is in
:mod:`lossy_hooks.core.netclock`; this module is the schedule's deterministic price.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from lossy_hooks.core.placement.schedule import Chunking, PhaseShape

if TYPE_CHECKING:
    from lossy_hooks.core.network import NetworkModel

__all__ = ["PhaseTiming"]


@dataclass(frozen=True, eq=False)
class PhaseTiming:
    """One phase of one bucket size on one network (see the module). Rows are the phase's
    hops (``L S``, the keep table's rows but the roots'), ``K`` slots each.

    ``level`` (``(R,)`` int64; rows that carry nothing at step 0), ``src``, ``dst``,
    ``duration`` ``D_h`` (seconds, float64; 0 where nothing is carried), ``valid`` (``(R,
    K)``: slots that carry a packet), ``step_lossfree`` ``tau0_t`` (``(T,)``), ``receives``
    (``(T, W)``: 1 where the rank receives at the step), all on
    ``device``; ``lossfree`` ``T_0`` and ``step_lossfree_host`` on the host."""

    levels: int
    level: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    duration: torch.Tensor
    valid: torch.Tensor
    step_lossfree: torch.Tensor
    receives: torch.Tensor  # (T, W) float64: 1 where the rank receives at the step
    step_lossfree_host: np.ndarray
    duration_host: np.ndarray
    level_host: np.ndarray
    lossfree: float

    @classmethod
    def of(
        cls,
        shape: PhaseShape,
        chunking: Chunking,
        packet_bytes: float,
        network: NetworkModel,
        device: torch.device | None = None,
    ) -> PhaseTiming:
        """The price of ``shape`` for a bucket chunked as ``chunking``, ``packet_bytes`` per packet."""
        world, steps = shape.world, shape.steps
        links = np.asarray(shape.links, dtype=np.int64).reshape(-1, 2)
        rows = len(links) * steps
        src = np.repeat(links[:, 0], steps)
        dst = np.repeat(links[:, 1], steps)
        valid = chunking.valid(shape) if rows else np.zeros((0, chunking.slots), dtype=bool)
        carried = valid.sum(1)
        busy = carried > 0
        level = np.where(busy, np.maximum(shape.hop_level, 0), 0)
        levels = max(shape.levels, 1)
        out = np.zeros((levels, world), dtype=np.int64)
        inn = np.zeros((levels, world), dtype=np.int64)
        np.add.at(out, (level[busy], src[busy]), 1)
        np.add.at(inn, (level[busy], dst[busy]), 1)
        share = np.maximum(out[level, src], inn[level, dst])
        duration = np.where(busy, network.alpha + share * carried * packet_bytes / network.beta, 0.0)
        step = np.zeros(levels, dtype=np.float64)
        np.maximum.at(step, level, duration)
        receives = (inn > 0).astype(np.float64)
        dev = device if device is not None else torch.device("cpu")

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

        return cls(
            levels,
            put(level),
            put(src),
            put(dst),
            put(duration),
            put(valid),
            put(step),
            put(receives),
            step,
            duration,
            level,
            float(step.sum()),
        )

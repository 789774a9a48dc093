r"""The hop schedule of a collective: which link carries which chunk at which step, the path
of every rank's contribution to a chunk's root, and the survival of packets along those paths.

A per-hop placement splits a bucket of ``n`` packets into ``C`` chunks (contiguous, sizes as
``numpy.array_split``: the first ``n mod C`` chunks hold ``ceil(n/C)`` packets, the others
``floor(n/C)``); chunk ``c`` has a root (the rank where it is reduced). Each phase is, per
chunk, a tree over the ``W`` ranks given by ``parent[c, r]``:

* ``reduce``: the rank ``r`` forwards its partial sum of chunk ``c`` to (towards the root);
* ``broadcast``: the rank ``r`` receives chunk ``c``'s result from;

``parent[c, root] = root``. Every other rank makes one transmission per chunk and phase over
the directed link ``(r, parent)`` (reduce) or ``(parent, r)`` (broadcast), at the step
``order[c, r]`` of the algorithm. A link carries its chunks in step order (chunk index
breaking ties), each as ``K = ceil(n/C)`` packet *slots* (slot ``i`` of a chunk holds its
packet ``i``; a chunk one packet shorter leaves its last slot empty), so a link's loss stream
runs over ``S K`` slots per collective, ``S`` the most chunks one link carries in the phase.
A *hop* is one ``(link, step)``: row ``link S + step`` of the phase's keep table
(``(L S, K)``, ``True`` = kept), with one more row, always kept, for the roots.

**Survival.** With zero fill a reduce-phase packet lost on a hop removes the partial sum it
carried (the receiver forwards its own contribution on), and a broadcast-phase packet lost
on a hop is missing at the receiver and everywhere it forwards to. Either way the packet of
rank ``r`` survives iff every hop on ``r``'s path to the root kept it:
``s[c, r, i] = prod_{h in path(c, r)} keep[h, i]``, computed by pointer doubling
(:func:`path_products`): ``s <- s * s[parent]``, ``parent <- parent[parent]``,
``ceil(log2 depth)`` times, ``O(C W K log W)`` work in that many tensor ops, with no loop
over ranks or hops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Chunking", "PhaseShape", "path_products"]


@dataclass(frozen=True, eq=False)
class PhaseShape:
    """One phase of a collective at one world size (see the module): its links, the most
    chunks one link carries (``steps``), each ``(chunk, rank)``'s parent and hop, and what
    every hop carries. ``parent`` / ``hop`` are ``(C, W)`` int64 (CPU; :meth:`on` moves them)."""

    world: int
    chunks: int
    links: tuple[tuple[int, int], ...]
    steps: int
    parent: torch.Tensor
    hop: torch.Tensor  # row of the keep table; len(links) * steps at a root (always kept)
    carries: np.ndarray  # (L * S,) the chunk each hop carries, -1 where none
    depth: int  # the longest path to a root, in hops
    hop_level: np.ndarray  # (L * S,) the hop's synchronous step (the timing rule), -1 where none
    levels: int  # synchronous steps of the phase

    @classmethod
    def build(cls, parent: np.ndarray, order: np.ndarray, towards_root: bool) -> PhaseShape:
        """The phase of the trees ``parent`` (``(C, W)``) with transmission steps ``order``;
        ``towards_root``: links run rank -> parent (reduce), else parent -> rank."""
        chunks, world = parent.shape
        c_idx, r_idx = np.nonzero(parent != np.arange(world)[None, :])
        up = parent[c_idx, r_idx]
        src, dst = (r_idx, up) if towards_root else (up, r_idx)
        keys, link_of = np.unique(src * world + dst, return_inverse=True)
        links = tuple(zip((keys // world).tolist(), (keys % world).tolist(), strict=True))
        sort = np.lexsort((c_idx, order[c_idx, r_idx], link_of))  # by link, then step, then chunk
        step = np.empty(len(sort), dtype=np.int64)
        first = np.r_[0, np.flatnonzero(np.diff(link_of[sort])) + 1] if len(sort) else np.zeros(0, int)
        counts = np.diff(np.r_[first, len(sort)])
        step[sort] = np.arange(len(sort)) - np.repeat(first, counts)
        steps = int(counts.max()) if len(counts) else 0
        hop = np.full((chunks, world), len(links) * steps, dtype=np.int64)
        hop[c_idx, r_idx] = link_of * steps + step
        carries = np.full(len(links) * steps, -1, dtype=np.int64)
        carries[hop[c_idx, r_idx]] = c_idx
        depth, reach = 0, np.broadcast_to(np.arange(world), parent.shape)
        rank_depth = np.zeros(parent.shape, dtype=np.int64)  # hops from (c, r) to the root
        while True:  # host, once per world size: hops until every rank is at its root
            up = np.take_along_axis(parent, reach, axis=1)
            if (up == reach).all():
                break
            rank_depth += up != reach
            reach, depth = up, depth + 1
        level = _levels(parent, rank_depth, towards_root)
        hop_level = np.full(len(links) * steps, -1, dtype=np.int64)
        hop_level[hop[c_idx, r_idx]] = level[c_idx, r_idx]
        return cls(
            world,
            chunks,
            links,
            steps,
            torch.from_numpy(parent.astype(np.int64)),
            torch.from_numpy(hop),
            carries,
            depth,
            hop_level,
            int(hop_level.max()) + 1 if len(hop_level) else 0,
        )

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(parent, hop)`` on ``device``."""
        return self.parent.to(device), self.hop.to(device)


def _levels(parent: np.ndarray, depth: np.ndarray, towards_root: bool) -> np.ndarray:
    """The synchronous step of each ``(chunk, rank)``'s transmission (store and forward):
    towards the root a rank sends once all its children's partial sums are in, at its
    *height* (0 for a leaf, ``1 + max`` over its children); away from it a rank receives one
    step after its parent did, at ``depth - 1``. (Roots: unused.)"""
    if not towards_root:
        return depth - 1
    height = np.zeros(parent.shape, dtype=np.int64)
    rows = np.broadcast_to(np.arange(parent.shape[0])[:, None], parent.shape)
    child = parent != np.arange(parent.shape[1])[None, :]
    for _ in range(int(depth.max()) if depth.size else 0):  # host, once per world size
        np.maximum.at(height, (rows[child], parent[child]), height[child] + 1)
    return height


@dataclass(frozen=True, eq=False)
class Chunking:
    """How a bucket of ``packets`` packets splits into ``chunks`` chunks of ``slots`` slots:
    ``packet_slot[j] = chunk(j) * slots + position(j)`` (int64, CPU) and each chunk's size."""

    packets: int
    chunks: int
    slots: int
    sizes: np.ndarray
    packet_slot: torch.Tensor

    @classmethod
    def of(cls, packets: int, chunks: int) -> Chunking:
        base, extra = divmod(packets, chunks)
        sizes = np.array([base + 1] * extra + [base] * (chunks - extra), dtype=np.int64)
        slots = max(int(sizes.max()) if chunks else 0, 1)
        starts = np.r_[0, np.cumsum(sizes)[:-1]]
        chunk = np.repeat(np.arange(chunks), sizes)
        position = np.arange(packets) - starts[chunk]
        return cls(packets, chunks, slots, sizes, torch.from_numpy(chunk * slots + position))

    def valid(self, shape: PhaseShape) -> np.ndarray:
        """``(L S, K)`` bool: which slots of each hop carry a packet."""
        size = np.where(shape.carries >= 0, self.sizes[np.maximum(shape.carries, 0)], 0)
        return np.arange(self.slots)[None, :] < size[:, None]


def path_products(edge: torch.Tensor, parent: torch.Tensor, depth: int) -> torch.Tensor:
    """``out[c, r, ...] = prod`` of ``edge[c, x, ...]`` over the ranks ``x`` on ``r``'s path
    to the root of chunk ``c`` (``r`` included, the root's own entry the identity: ``True``
    or ``1``), by pointer doubling over ``parent`` (``(C, W)``); ``edge`` is ``(C, W)`` or
    ``(C, W, K)``, bool (all kept) or float (probabilities). ``ceil(log2 depth)`` gathers."""
    out, jump = edge, parent
    for _ in range(math.ceil(math.log2(depth)) if depth > 1 else 0):
        index = jump if out.dim() == 2 else jump.unsqueeze(-1).expand_as(out)
        out = out * out.gather(1, index)
        jump = jump.gather(1, jump)
    return out

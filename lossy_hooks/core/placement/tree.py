r"""Reduce-then-broadcast trees: NCCL's binary tree (``algorithm="tree"``) and its double
binary tree (``algorithm="dbtree"``).

**The binary tree** (NCCL's ``ncclGetBtree``): rank 0 is the root, with the largest power of
two below ``W`` as its one child; for any other rank ``r`` with lowest set bit ``b``, the
parent is ``(r xor b) | 2b``, or ``r xor b`` when that is ``>= W``. Leaves are the odd
ranks; depth is about ``log2 W``. Reduce: every rank sends its subtree's partial sum to its
parent (a lost packet removes the whole subtree's contribution), so the contribution of a
rank at depth ``d`` survives with ``(1 - p)^d``; broadcast: the root's result travels down,
received at depth ``d`` with ``(1 - p)^d``. The whole bucket crosses every edge.

**The double binary tree** (NCCL's ``ncclGetDtree``): the first half of the bucket's packets
on the binary tree, the second half on a complementary tree, the binary tree with every
position ``q`` taken by rank ``(q + 1) mod W`` (``W`` even: a shift by one, so the odd ranks,
the first tree's leaves, are the second's interior) or ``W - 1 - q`` (``W`` odd: mirrored).
A directed link of both trees carries both halves, the first one first. This is the rule of
NCCL 2.5.6 to 2.7.8; NCCL 2.8.3 swapped it (mirrored at even ``W``, shifted at odd ``W``), so
from 2.8.3 on the second tree differs at every ``W > 2``.
"""

from __future__ import annotations

import numpy as np

from lossy_hooks.core.placement.base import Phase
from lossy_hooks.core.placement.hops import HopPlacement

__all__ = ["DoubleTree", "Tree", "binary_tree_parents"]


def binary_tree_parents(world: int) -> np.ndarray:
    """NCCL's binary tree over ``world`` ranks: ``parent[r]`` (the root, 0, its own)."""
    parent = np.zeros(world, dtype=np.int64)
    for r in range(1, world):  # host, once per world size
        bit = r & -r
        up = (r ^ bit) | (bit << 1)
        parent[r] = up if up < world else r ^ bit
    return parent


def complementary_tree_parents(world: int) -> np.ndarray:
    """The double tree's second tree: position ``q`` of the binary tree held by rank
    ``(q + 1) mod W`` (``W`` even) or ``W - 1 - q`` (``W`` odd)."""
    first = binary_tree_parents(world)
    rank_at = (np.arange(world) + 1) % world if world % 2 == 0 else world - 1 - np.arange(world)
    parent = np.empty(world, dtype=np.int64)
    parent[rank_at] = rank_at[first]
    return parent


class Tree(HopPlacement):
    """``algorithm="tree"``: the whole bucket on NCCL's binary tree (see the module)."""

    name = "tree"

    def parents(self, world: int) -> list[np.ndarray]:
        """One tree per chunk."""
        return [binary_tree_parents(world)]

    def chunk_count(self, world: int) -> int:
        return len(self.parents(world))

    def trees(self, world: int) -> dict[Phase, tuple[np.ndarray, np.ndarray]]:
        parent = np.stack(self.parents(world))
        order = np.zeros_like(parent)
        return {"reduce": (parent, order), "broadcast": (parent.copy(), order)}


class DoubleTree(Tree):
    """``algorithm="dbtree"``: each half of the bucket on one of NCCL's two complementary
    binary trees (see the module)."""

    name = "dbtree"

    def parents(self, world: int) -> list[np.ndarray]:
        return [binary_tree_parents(world), complementary_tree_parents(world)]

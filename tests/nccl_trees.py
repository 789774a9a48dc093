"""NCCL's binary and double binary trees, transcribed line by line from ``src/graph/trees.cc``
(``ncclGetBtree``, ``ncclGetDtree``) of NCCL 2.5.6 to 2.7.8, for the tests: the literal
algorithms and the tests' expectations build their trees here, never with the package's
helpers (lossy_hooks.core.placement.tree), so a wrong rule there shows as a disagreement.

That version's second tree is the first shifted by one rank when ``nranks`` is even and
mirrored when it is odd (what the package implements). NCCL 2.8.3 swapped the two (shift
when odd, mirror when even); this file follows the package's documented version.
"""

from __future__ import annotations


def nccl_get_btree(nranks: int, rank: int) -> tuple[int, int, int]:
    """``ncclGetBtree(nranks, rank, &u, &d0, &d1)``: parent and two children, ``-1`` for none."""
    bit = 1
    while bit < nranks:  # for (bit=1; bit<nranks; bit<<=1) { if (bit & rank) break; }
        if bit & rank:
            break
        bit <<= 1

    if rank == 0:
        return -1, (bit >> 1 if nranks > 1 else -1), -1

    up = (rank ^ bit) | (bit << 1)
    if up >= nranks:
        up = rank ^ bit

    lowbit = bit >> 1
    # down0 is always within bounds
    down0 = -1 if lowbit == 0 else rank - lowbit
    down1 = -1 if lowbit == 0 else rank + lowbit
    # Make sure down1 is within bounds
    while down1 >= nranks:
        down1 = -1 if lowbit == 0 else rank + lowbit
        lowbit >>= 1
    return up, down0, down1


def nccl_get_dtree(nranks: int, rank: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``ncclGetDtree``: ``((s0, d0_0, d0_1), (s1, d1_0, d1_1))``, the two trees' parent and
    children of ``rank``."""
    first = nccl_get_btree(nranks, rank)
    if nranks % 2 == 0:
        # shift
        shiftrank = (rank - 1 + nranks) % nranks
        u, d0, d1 = nccl_get_btree(nranks, shiftrank)
        second = tuple(-1 if x == -1 else (x + 1) % nranks for x in (u, d0, d1))
    else:
        # mirror
        u, d0, d1 = nccl_get_btree(nranks, nranks - 1 - rank)
        second = tuple(-1 if x == -1 else nranks - 1 - x for x in (u, d0, d1))
    return first, second  # type: ignore[return-value]


def nccl_tree_parents(world: int) -> list[list[int]]:
    """The two trees as parent lists (the root its own parent, the package's convention)."""
    trees = [nccl_get_dtree(world, r) for r in range(world)]
    return [[r if t[i][0] == -1 else t[i][0] for r, t in enumerate(trees)] for i in (0, 1)]


def nccl_tree_children(world: int) -> list[list[set[int]]]:
    """The two trees' children of every rank, as NCCL lists them (``d0``, ``d1``)."""
    trees = [nccl_get_dtree(world, r) for r in range(world)]
    return [[{x for x in t[i][1:] if x != -1} for t in trees] for i in (0, 1)]

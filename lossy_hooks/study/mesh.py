r"""Which ranks form which group when a run composes its parallelisms (``--tp``, ``--pp``,
``--ep`` with data parallelism): the one home of the rank arithmetic, pure (no process
group), used by the layout (:func:`lossy_hooks.study.parallel.model_parallel_layout`), the
traffic seeds (:func:`lossy_hooks.study.traffic.traffic_states`) and the refusals.

The mesh is ``dp x pp x tp`` (``W = dp * pp * tp``), tensor parallelism innermost (its ranks
consecutive: the fastest links of a node), then the pipeline stages, then the data-parallel
replicas: rank

.. math:: r(d, s, t) = (d \cdot pp + s) \cdot tp + t, \qquad 0 \le d < dp,\ 0 \le s < pp,\ 0 \le t < tp.

Expert parallelism is within data parallelism (as torchtitan's ``ep`` borrows data-parallel
ranks): ``ep`` divides ``dp``, and the replica index splits as :math:`d = g \cdot ep + i`; an
ep group is the ``ep`` consecutive replicas :math:`i = 0..ep-1` of block :math:`g` at the
same :math:`(s, t)`, and its rank :math:`i` holds experts :math:`[i E/ep, (i+1) E/ep)`. The
ranks holding the same experts (the same :math:`(i, s, t)`, every :math:`g`) are an
``expert_replica`` group: their expert gradients are summed outside DDP.

Groups of a kind are listed in one order for every rank (``new_group`` needs it), and a
group's index in that list is what seeds its traffic stream:

- ``tp``: for each :math:`(d, s)` the ranks :math:`t = 0..tp-1`; index :math:`d \cdot pp + s`.
- ``pp``: for each :math:`(d, t)` the stages :math:`s = 0..pp-1`; index :math:`d \cdot tp + t`.
- ``dp``: for each :math:`(s, t)` the replicas :math:`d = 0..dp-1`; index :math:`s \cdot tp + t`.
- ``ep``: for each :math:`(g, s, t)` the replicas :math:`i = 0..ep-1`; index
  :math:`(g \cdot pp + s) \cdot tp + t`.
- ``expert_replica``: for each :math:`(i, s, t)` the blocks :math:`g = 0..dp/ep-1`.

With one parallelism these are the layouts of before (``rank // size`` the group index of
``tp``, ``pp`` and ``ep``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GROUP_KINDS", "MeshShape"]

GROUP_KINDS = ("tp", "pp", "dp", "ep", "expert_replica")


@dataclass(frozen=True)
class MeshShape:
    """``world`` ranks as ``dp x pp x tp`` with ``ep`` dividing ``dp`` (see the module)."""

    world: int
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("world", "tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        model = self.tp * self.pp
        if self.world % model:
            named = [(k, getattr(self, k)) for k in ("tp", "pp") if getattr(self, k) > 1]
            if len(named) == 1:
                ((k, size),) = named
                raise ValueError(f"--{k} {size} must divide the world size {self.world} (W = dp x {k})")
            raise ValueError(
                f"--tp {self.tp} x --pp {self.pp} = {model} must divide the world size {self.world} "
                "(W = dp x pp x tp)"
            )
        if self.dp % self.ep:
            where = (
                f"the world size {self.world}"
                if model == 1
                else f"the data-parallel size {self.dp} (W / (tp x pp) = {self.world} / {model})"
            )
            raise ValueError(f"--ep {self.ep} must divide {where}: ep groups within the data-parallel ranks")

    @property
    def dp(self) -> int:
        """The data-parallel size :math:`W / (pp \\cdot tp)`."""
        return self.world // (self.tp * self.pp)

    def rank(self, d: int, s: int, t: int) -> int:
        """The rank of replica ``d``, stage ``s``, tensor rank ``t``."""
        return (d * self.pp + s) * self.tp + t

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(d, s, t)`` of ``rank``."""
        return rank // (self.pp * self.tp), rank // self.tp % self.pp, rank % self.tp

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of ``kind`` (one of :data:`GROUP_KINDS`), in the order every rank lists
        them."""
        dp, pp, tp, ep, r = self.dp, self.pp, self.tp, self.ep, self.rank
        if kind == "tp":
            return [[r(d, s, t) for t in range(tp)] for d in range(dp) for s in range(pp)]
        if kind == "pp":
            return [[r(d, s, t) for s in range(pp)] for d in range(dp) for t in range(tp)]
        if kind == "dp":
            return [[r(d, s, t) for d in range(dp)] for s in range(pp) for t in range(tp)]
        blocks = dp // ep
        if kind == "ep":
            return [
                [r(g * ep + i, s, t) for i in range(ep)]
                for g in range(blocks)
                for s in range(pp)
                for t in range(tp)
            ]
        if kind == "expert_replica":
            return [
                [r(g * ep + i, s, t) for g in range(blocks)]
                for i in range(ep)
                for s in range(pp)
                for t in range(tp)
            ]
        raise ValueError(f"unknown group kind {kind!r} (kinds: {', '.join(GROUP_KINDS)})")

    def group_index(self, kind: str, rank: int) -> int:
        """The index, in :meth:`groups`, of ``rank``'s group of ``kind`` (its traffic seed)."""
        return next(i for i, ranks in enumerate(self.groups(kind)) if rank in ranks)

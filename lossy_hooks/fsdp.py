r"""Lossy collectives for FSDP2 (``torch.distributed.fsdp.fully_shard``): a reduce-scatter of
gradients and an all-gather of parameters that lose packets, configured by the same
:class:`~lossy_hooks.LossyState` as the DDP hook (loss models, drop points, fills, seeds,
counters, checkpoints).

Usage (two lines on plain FSDP2 code)::

    from lossy_hooks import LossyState, fsdp
    fsdp.register(model, LossyState(loss_rate=0.05, drop_point="worker"))      # gradients
    fsdp.register(model, state, all_gather=fsdp.gather_state(loss_rate=0.01))  # + parameters

The math (``W`` ranks; FSDP hands a reduce-scatter ``W`` rows, row ``j`` being this rank's
contribution ``g_{r,j}`` to the shard rank ``j`` owns, and an all-gather ``W`` rows, row
``j`` being rank ``j``'s parameter shard; every row is split into the same ``n`` MTU
packets, a packet never crossing a row). A rank's own row never crosses the network, so it
is never lost: rank ``r`` sends ``W - 1`` rows (``(W-1) n`` packets) per reduce-scatter and
receives ``W - 1`` rows per all-gather, and those are the packets counted as sent.

Reduce-scatter (``a_{r,j,i} = 1`` when rank ``r``'s packet ``i`` for shard ``j`` arrives,
``a_{j,j,i} = 1``; ``c_{j,i} = \sum_r a_{r,j,i} \ge 1``; ``s = 1/W`` for FSDP's average,
``1`` for ``reduction="sum"``):

- lossless: ``S_j = s \sum_r g_{r,j}``, FSDP's own collective on FSDP's own tensors
  (bitwise equal to FSDP without the custom collective).
- worker drop, ``fill="zero"``: ``S_{j,i} = s \sum_r a_{r,j,i} g_{r,j,i}``.
- worker drop, ``fill="rescale"``: ``S_{j,i} = s (W / c_{j,i}) \sum_r a_{r,j,i} g_{r,j,i}``,
  the mean over the contributions that arrived (never empty: the owner's is local). The
  counts come from replaying the other ranks' masks (``counts_transport="regenerate"``,
  ``W/c`` folded into the factor each rank applies before the collective) or from a second
  reduce-scatter of int32 arrival counts (``"separate"``, ``W/c`` applied to the shard).
- post drop (packets of the reduced shard lost on their way to its owner), mask ``b_i``:
  ``"zero"``: ``b_i S_{j,i}``; ``"rescale"``: ``b_i S_{j,i} / q`` (``q`` the loss model's
  expected kept fraction, as for DDP); ``"stale"``: the last value received for the packet.
  ``post_sync="shared"`` draws one mask for the whole result (``W n`` packets, from the
  seed alone: every rank knows every rank's loss) and each rank keeps its row;
  ``"independent"`` draws ``n`` packets per rank.

All-gather (a separate state, :func:`gather_state`: drop point ``"post"``, what a receiver
loses): rank ``r`` receives ``P_{j,i}`` for ``j \ne r`` when ``b_{r,j,i} = 1``, else
``"stale"`` (the default): the last value of that packet it received, or ``"zero"``. Stale is
the default because a lost parameter is still a parameter: the previous value differs from
the current one by a few optimizer steps, while zero turns off units (a zeroed norm gain
silences a whole channel). Before the first gather every rank built the whole model before
``fully_shard`` sharded it, so the stale copy starts as the first gather's values (a loss at
the very first gather changes nothing). ``post_sync="independent"`` (the default of
:func:`gather_state`) draws each receiver's losses on its own; ``"shared"`` loses a sender's
packet for every receiver at once.

**Per hop** (``algorithm="ring"`` or ``"direct"``, :mod:`lossy_hooks.core.placement`): row
``c`` is chunk ``c`` of the algorithm, rooted at its owner, rank ``c``. The reduce-scatter is
the reduce phase (drop point ``"worker"`` only): ``a_{r,c,i}`` is the survival of rank
``r``'s contribution along its path to ``c`` (on a ring ``(1-p)^d`` at ``d`` hops upstream,
a lost hop removing the partial sum it carried), ``c_{c,i}`` the contributions that arrived
(every rank replays every hop: no counts travel), so the rules above hold with those masks.
The all-gather is the broadcast phase: rank ``r`` receives packet ``i`` of rank ``c``'s
shard where every hop between them kept it (ring: ``k`` hops downstream). The backend's own
reduce-scatter / all-gather carries the values; NCCL runs both as rings. Trees have no
sharded form and are refused.

Both collectives run synchronously on the stream FSDP calls them on (FSDP's reduce-scatter
and all-gather streams on CUDA: the host does not wait) and return ``None``; the masks are
drawn on the tensors' device, with no host synchronisation. The reduce-scatter runs the DDP
hook's technique chain on its rows (:mod:`lossy_hooks.core.pipeline.chain`: error feedback,
Hadamard per row, the wire dtype, ``measure_fidelity``; retransmission on the masks).
Settings that need a bucket of parameters (``protect``, ``packetization="tensor"``), FEC
and the simulated clock, and on the all-gather every technique of the chain, are refused by
:func:`check_state` with the reason (docs/semantics.md).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllocMixin

from lossy_hooks.core.buckets import BucketRecord
from lossy_hooks.core.pipeline.sharded import ShardedCollectives, sharded_refusal
from lossy_hooks.core.state import LossyState

__all__ = ["LossyAllGather", "LossyReduceScatter", "check_state", "fully_shard", "gather_state", "register"]


def check_state(state: LossyState, collective: str = "reduce-scatter") -> None:
    """Raise ``ValueError`` naming the setting if ``state`` asks for something the FSDP
    collectives do not do (``collective``: ``"reduce-scatter"`` or ``"all-gather"``;
    :func:`~lossy_hooks.core.pipeline.sharded.sharded_refusal`)."""
    why = sharded_refusal(state, collective)
    if why is not None:
        raise ValueError(f"FSDP {why}")
    if collective == "all-gather":
        if state.drop_point != "post" or not state.fill_technique.for_parameters:
            raise ValueError(
                "FSDP all-gather: the state must have drop_point='post' (a receiver loses packets of "
                "other ranks' parameter shards) and fill 'stale' or 'zero' (a parameter has nothing to "
                f"rescale); got drop_point={state.drop_point!r}, fill={state.fill!r} (see gather_state)"
            )


def gather_state(
    loss_rate: float | None = None, fill: str = "stale", post_sync: str | None = None, **kwargs: Any
) -> LossyState:
    """A :class:`~lossy_hooks.LossyState` for the lossy all-gather: drop point ``"post"``,
    ``fill`` ``"stale"`` (default) or ``"zero"``, per-receiver losses by default
    (``post_sync="independent"``; with a per-hop ``algorithm`` the algorithm decides who
    misses a packet: ``"shared"``). Other arguments (``mtu``, ``loss_model``, ``seed``,
    ``algorithm``, ...) as for ``LossyState``."""
    if post_sync is None:
        post_sync = "independent" if kwargs.get("algorithm", "ps") == "ps" else "shared"
    state = LossyState(loss_rate=loss_rate, drop_point="post", fill=fill, post_sync=post_sync, **kwargs)
    check_state(state, "all-gather")
    return state


class _LossyComm(DefaultAllocMixin):
    """What both lossy collectives hold: the state's sharded pipeline
    (:class:`~lossy_hooks.core.pipeline.sharded.ShardedCollectives`, shared by every unit of
    one :func:`register` call), the unit's index and name."""

    def __init__(self, pipeline: ShardedCollectives, index: int, label: str) -> None:
        self.pipeline, self.index, self.label = pipeline, index, label

    def _record(self, rows: torch.Tensor, post_rows: int) -> BucketRecord:
        return self.pipeline.state.buckets.shard_record(self.index, self.label, rows, post_rows)


class LossyReduceScatter(_LossyComm, ReduceScatter):
    """FSDP2's gradient reduce-scatter with packet loss (see the module docs)."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: Any,
        async_op: bool = False,
    ) -> dist.Work | None:
        self.pipeline.reduce_scatter(output_tensor, input_tensor, group, op, self._record)
        return None


class LossyAllGather(_LossyComm, AllGather):
    """FSDP2's parameter all-gather with packet loss at the receivers (see the module docs)."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> dist.Work | None:
        self.pipeline.all_gather(output_tensor, input_tensor, group, self._record)
        return None


def _groups(model: nn.Module) -> list[tuple[str, FSDPModule]]:
    """``(name, module)`` of every FSDP unit of ``model`` that manages parameters, once per
    unit (``fully_shard([a, b])`` makes one unit of two modules: the first one names it)."""
    out, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            unit = module._get_fsdp_state()
            groups = getattr(unit, "_fsdp_param_groups", None)
            if id(unit) not in seen and (groups is None or len(groups) > 0):
                seen.add(id(unit))
                out.append((name or "(root)", module))
    return out


def register(model: nn.Module, state: LossyState | None, all_gather: LossyState | None = None) -> list[str]:
    """Wire the lossy reduce-scatter (``state``: gradients) and, with ``all_gather``, the
    lossy all-gather (parameters) into every FSDP module of ``model`` (after
    ``fully_shard``). Either may be ``None``. Returns the names of the wired modules, in
    the order that numbers them (``index`` in the counters)."""
    groups = _groups(model)
    if not groups:
        raise TypeError(
            "lossy_hooks.fsdp.register: the model has no FSDP module with parameters; call "
            "torch.distributed.fsdp.fully_shard on it (and its blocks) first"
        )
    if state is None and all_gather is None:
        raise ValueError("lossy_hooks.fsdp.register: give a state, an all_gather state, or both")
    if state is not None:
        check_state(state, "reduce-scatter")
    if all_gather is not None:
        check_state(all_gather, "all-gather")
        if all_gather is state:
            raise ValueError("lossy_hooks.fsdp.register: the all-gather needs a LossyState of its own")
    if dist.is_initialized() and dist.get_world_size() == 1:
        warnings.warn(
            "lossy_hooks.fsdp.register at world size 1: FSDP calls no collective there, so nothing "
            "is lost (DDP's hook still applies post drops at world size 1)",
            RuntimeWarning,
            stacklevel=2,
        )
    scatter = ShardedCollectives(state, len(groups)) if state is not None else None
    gather = ShardedCollectives(all_gather, 0) if all_gather is not None else None
    for index, (name, module) in enumerate(groups):
        if scatter is not None:
            module.set_custom_reduce_scatter(LossyReduceScatter(scatter, index, name))
        if gather is not None:
            module.set_custom_all_gather(LossyAllGather(gather, index, name))
    return [name for name, _ in groups]

r"""The lossy allreduce communication hook for DDP, and its state.

Usage (PyTorch's PowerSGD convention: a state object plus a hook function)::

    from lossy_hooks import LossyState, lossy_allreduce_hook
    state = LossyState(loss_rate=0.05, mtu=1500, drop_point="worker", fill="rescale")
    ddp_model.register_comm_hook(state, lossy_allreduce_hook)
    ...
    print(state.stats())

The math (``W`` ranks, rank ``r`` holds bucket ``g_r``, split into packets ``j = 0..n-1`` by
:class:`~lossy_hooks.core.packetization.PacketLayout`; ``a_{r,j} = 1`` when rank ``r``'s copy of
packet ``j`` arrives; ``c_j = sum_r a_{r,j}``; ``s = 1/W`` for ``reduction="mean"``, ``1``
for ``"sum"``):

- lossless (and DDP's own): ``R = sum_r s * g_r``. With loss 0 the hook computes exactly
  this (each rank multiplies by the scalar ``1/W`` before the sum, as DDP's reducer does),
  so results are bitwise equal to DDP without a hook at any ``W``.
- worker drop, ``fill="zero"``: ``R_j = sum_r s * a_{r,j} g_{r,j}`` (a lost copy counts as 0).
- worker drop, ``fill="rescale"``: ``R_j = (W / c_j) * sum_r s * a_{r,j} g_{r,j}`` (``0`` if
  ``c_j = 0``): the mean over the copies that arrived, unbiased given ``c_j > 0``. The counts
  ``c_j`` are summed by one small extra allreduce (``counts_transport="separate"``),
  appended to the bucket in the same allreduce (``"append"``), or computed locally with no
  communication (``"regenerate"``: every rank replays every other rank's mask from that
  rank's ``(seed, rank)`` generator, W times the sampling work); ``"auto"`` (default) picks
  ``"regenerate"`` on CPU with at most 4 ranks, else ``"separate"``
  (:func:`resolve_counts_transport`).
- post drop (after the collective), mask ``b_j = 1`` when packet ``j`` of the result arrives:
  ``"zero"``: ``b_j R_j``; ``"rescale"``: ``b_j R_j / q_n`` with ``q_n`` the loss model's
  expected kept fraction of an ``n``-packet bucket (``LossModel.keep_fraction``: ``1 - p`` for
  random loss, ``(n - floor(p n))/n`` for ``exact``; unbiased: ``E[b_j] = q_n``); ``"stale"``:
  ``R_j`` if ``b_j`` else the last finite value this rank received for packet ``j`` (0 before
  the first; filled by selection, so received packets are never touched).
  ``post_sync="shared"`` draws one mask for all ranks (replicas stay identical);
  ``"independent"`` one per rank (replicas drift).
- ``drop_point="both"``: worker drop, the collective, then post drop; rescale factors multiply.
"""

import torch
import torch.distributed as dist

from lossy_hooks.core.pipeline import all_reduce
from lossy_hooks.core.process_group import collective_device, lossy_kinds
from lossy_hooks.core.state import LossyState, derive_seed, resolve_counts_transport

__all__ = [
    "LossyState",
    "collective_device",
    "derive_seed",
    "lossy_allreduce_hook",
    "resolve_counts_transport",
]


def lossy_allreduce_hook(state: LossyState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    r"""DDP communication hook: packetized, lossy allreduce of ``bucket`` (see module docs).

    A thin adapter onto the packet pipeline (:func:`lossy_hooks.core.pipeline.all_reduce`):
    the bucket's record is keyed on its parameters (:meth:`BucketRecords.lookup`), a step
    ends with DDP's last bucket, and a mean's ``1/W`` is this rank's factor before the sum.
    Packet masks are drawn on the bucket's device from per-rank generators. Everything known
    before the collective and identical across ranks (the ``1/W`` of a mean, the worker keep
    mask ``a_{r,j}``, ``W/c_j`` under ``counts_transport="regenerate"``, a shared post mask
    and its rescale factor) is one per-packet factor applied to this rank's copy in one pass;
    what needs the collective's result (``W/c_j`` from summed counts, independent post masks,
    stale fill) is applied to the result in one more pass. All collectives are launched
    asynchronously here; the returned future's callbacks only compute.
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    if "all_reduce" in lossy_kinds(group):
        raise ValueError(
            "lossy_allreduce_hook: the state's process group is a lossy_group that loses all_reduce "
            "packets already (the loss would apply twice): register the hook on a plain group, or "
            "give DDP the lossy group without the hook"
        )
    buf = bucket.buffer()
    scale = 1.0 / dist.get_world_size(group) if state.reduction == "mean" else 1.0
    future, _ = all_reduce(
        state, buf, group, lambda: state.buckets.lookup(bucket, buf), scale, bucket.is_last()
    )
    return future

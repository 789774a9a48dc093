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

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from lossy_hooks.core.process_group import collective_device
from lossy_hooks.core.state import LossyState, derive_seed, resolve_counts_transport
from lossy_hooks.core.techniques import BucketCall

__all__ = [
    "LossyState",
    "collective_device",
    "derive_seed",
    "lossy_allreduce_hook",
    "resolve_counts_transport",
]


def _join(
    futures: list[torch.futures.Future],
    on_cuda: bool,
    fn: Callable[[list[torch.Tensor]], torch.Tensor],
    read_in_callback: tuple[torch.Tensor | None, ...] = (),
) -> torch.futures.Future[torch.Tensor]:
    """One future for all collectives the hook launched, then ``fn`` on their results.

    All collectives are launched in the hook body (never from a callback). On CUDA/NCCL the
    work futures complete at enqueue and ``wait()`` only orders streams, so chaining on the
    first (CUDA-aware) future keeps DDP's stream synchronisation; on CPU/Gloo they complete
    on worker threads and ``collect_all`` waits for all of them.

    The stream rule (CUDA): a callback runs on a stream of its own. The futures' values are
    recorded on it by the future itself; every *other* tensor the callback reads that was
    made on the hook's stream (``read_in_callback``: masks, factors, counts, stale buffers,
    counters) is ``record_stream``-ed on the callback's stream before it is read, so the
    caching allocator cannot hand its memory to a new tensor until the callback's kernels
    have run, even after the hook's last reference to it is gone.
    """
    kept = tuple(t for t in read_in_callback if t is not None)

    def protect() -> None:
        stream = torch.cuda.current_stream()
        for t in kept:
            t.record_stream(stream)

    main, rest = futures[0], futures[1:]
    if on_cuda:

        def on_device(f: torch.futures.Future) -> torch.Tensor:
            protect()
            return fn([f.value()[0]] + [x.wait()[0] for x in rest])

        return main.then(on_device)
    if not rest:
        return main.then(lambda f: fn([f.value()[0]]))
    return torch.futures.collect_all(futures).then(lambda f: fn([x.value()[0] for x in f.value()]))


def _finish(call: BucketCall, results: list[torch.Tensor]) -> torch.Tensor:
    """The callback: the bucket's result (counts appended to it split off), then every
    technique's :meth:`~lossy_hooks.core.techniques.Technique.after_collective` in reverse
    chain order. Compute only."""
    out = results[0]
    if call.appended is not None:
        numel = call.record.layout.numel
        out, call.appended_result = out[:numel], out[numel:]
    call.results = results
    for technique in reversed(call.state.techniques):
        out = technique.after_collective(call, out)
    return out


def _allreduce(tensor: torch.Tensor, group: Any) -> torch.futures.Future:
    return dist.all_reduce(tensor, group=group, async_op=True).get_future()


def lossy_allreduce_hook(state: LossyState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    r"""DDP communication hook: packetized, lossy allreduce of ``bucket`` (see module docs).

    Packet masks are drawn on the bucket's device from per-rank generators. Everything known
    before the collective and identical across ranks (the ``1/W`` of a mean, the worker keep
    mask ``a_{r,j}``, ``W/c_j`` under ``counts_transport="regenerate"``, a shared post mask
    and its rescale factor) is one per-packet factor applied to this rank's copy in one pass;
    what needs the collective's result (``W/c_j`` from summed counts, independent post masks,
    stale fill) is applied to the result in one more pass. All collectives are launched
    asynchronously here; the returned future's callbacks only compute.
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buf = bucket.buffer()
    state.prepare(buf, group)
    state.bucket_calls += 1
    assert state.world_size is not None
    # ``1/W`` as DDP's reducer applies it: a multiply by the scalar (bitwise DDP at any W)
    scale = 1.0 / state.world_size if state.reduction == "mean" else 1.0
    if state.passing_through:
        if scale != 1.0:
            buf.mul_(scale)
        return _join([_allreduce(buf, group)], buf.is_cuda, lambda r: r[0])
    record = state.buckets.lookup(bucket, buf)
    step = state.steps
    if bucket.is_last():
        state.steps += 1
    if state.clock is not None:  # the simulated network: this collective's arrivals and times
        n = record.layout.num_packets
        state.clock.tick(n, record.wire_bytes, record.wire_bytes / n)
    call = BucketCall(state, record, buf, state.world_size, scale, step)
    state.draw_masks(call)  # where the placement loses: this rank's masks, counted
    wire = buf
    for technique in state.techniques:  # fidelity, error feedback, encoding, the fill, wire dtype
        wire = technique.before_wire(call, wire)
    main = wire if call.appended is None else torch.cat((wire, call.appended))
    # the bucket through the placement's collective; counts and the reference arrive whole
    futures = [state.placement.all_reduce(main, group), *(_allreduce(t, group) for t in call.extra)]
    return _join(futures, buf.is_cuda, functools.partial(_finish, call), tuple(call.kept))

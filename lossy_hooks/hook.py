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
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lossy_hooks.core.buckets import BucketRecord
from lossy_hooks.core.encoding import decode_, encode, rotation_dtype
from lossy_hooks.core.ledger import collective_device
from lossy_hooks.core.packetization import PacketLayout
from lossy_hooks.core.pipeline import arrival_factor, post_keep, regenerated_counts, stale_fill_
from lossy_hooks.core.state import LossyState, derive_seed, resolve_counts_transport

__all__ = [
    "LossyState",
    "collective_device",
    "derive_seed",
    "lossy_allreduce_hook",
    "resolve_counts_transport",
]


def _exact_factor(value: float, dtype: torch.dtype) -> bool:
    """Whether ``1/W`` may be folded into the fp32 per-packet factor (then cast to the bucket
    dtype) and still give exactly DDP's arithmetic, ``grad * (1/W)`` with the scalar in the
    op's compute precision: in fp32 always (``x * float32(1/W)`` both ways); in other dtypes
    only for ``W`` a power of two (``1/3`` as an fp32 factor cast to fp64 differs from the fp64
    ``1/3``; cast to bf16 it is ``0.33398``, a bias of ``2^-8`` on every element)."""
    return dtype == torch.float32 or math.frexp(value)[0] == 0.5


def _scale_before_collective(
    buf: torch.Tensor, layout: PacketLayout, pre: torch.Tensor | None, scale: float
) -> None:
    """``buf <- buf * scale * pre[packet]`` in place, in one pass where that is exact: a
    received packet with factor 1 ends up exactly as DDP's ``grad * (1/W)``."""
    if pre is None:
        if scale != 1.0:
            buf.mul_(scale)
    elif _exact_factor(scale, buf.dtype):
        layout.scale_(buf, pre.mul_(scale) if scale != 1.0 else pre)
    else:  # 1/W would round in the factor's cast: multiply by the scalar first, as DDP does
        buf.mul_(scale)
        layout.scale_(buf, pre)


_FIDELITY_CHUNK = 2**14


def _fidelity_sums(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``[<x, ref>, <x, x>, <ref, ref>, |x - ref|^2]`` in fp64.

    Dot products of fp32 chunks of ``2^14`` elements (``linalg.vecdot``: an elementwise
    product and a cascade sum, no matmul, so TF32 settings do not apply), chunk results
    summed in fp64: relative error ~1e-9 against all-fp64 sums, at a third of their time
    on CPU, without fp64 copies of the bucket."""
    if x.dtype not in (torch.float32, torch.float64):
        x, ref = x.float(), ref.float()
    d = x - ref
    m = x.numel() // _FIDELITY_CHUNK * _FIDELITY_CHUNK
    pairs = ((x, ref), (x, x), (ref, ref), (d, d))
    main = torch.stack(
        [
            torch.linalg.vecdot(a[:m].view(-1, _FIDELITY_CHUNK), b[:m].view(-1, _FIDELITY_CHUNK))
            for a, b in pairs
        ]
    )
    tail = torch.stack([a[m:].double().dot(b[m:].double()) for a, b in pairs])
    return main.double().sum(1) + tail


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


@dataclass
class _Plan:
    """What the hook decided for one bucket, and what finishing it needs: per-packet factors
    (fp32), masks and counters on the bucket's device."""

    layout: PacketLayout
    world: int
    pre: torch.Tensor | None = None  # on this rank's copy, before the collective
    post: torch.Tensor | None = None  # on the result (independent post mask)
    counts: torch.Tensor | None = None  # arrival counts to sum: W / c_j after the collective
    appended: bool = False  # counts travel in the bucket's own allreduce
    unrecovered: torch.Tensor | None = None  # ledger counter of packets no copy reached
    post_lost: torch.Tensor | None = None  # the post loss mask (stale fill selects by it)
    stale: torch.Tensor | None = None  # last received values (fill="stale")
    clean: torch.Tensor | None = None  # the lossless copy (measure_fidelity)
    fidelity_slot: torch.Tensor | None = None  # where the fidelity sums go
    bucket: torch.Tensor | None = None  # DDP's buffer, when what travels is another tensor
    signs: torch.Tensor | None = None  # encoding="hadamard": this call's sign words (D)
    block: int = 0  # encoding="hadamard": the block size option

    def read_in_callback(self) -> tuple[torch.Tensor | None, ...]:
        return (
            self.post,
            self.post_lost,
            self.counts,
            self.stale,
            self.fidelity_slot,
            self.clean,
            self.unrecovered,
            self.bucket,
            self.signs,
        )


def _plan_masks(state: LossyState, record: BucketRecord, plan: _Plan, buf: torch.Tensor) -> None:
    """Draw this bucket's masks and fold everything known before the collective and the same
    on every rank (keep mask ``a_{r,j}``, ``W/c_j`` when regenerated, a shared post mask and
    its rescale) into ``plan.pre``; leave the rest (summed counts, an independent post mask)
    for :func:`_finish`."""
    key = record.key
    lost = state.draw(state.worker, record) if state.drops_before else None
    if lost is not None:
        plan.pre = (~lost).float()  # a_{r,j}
        if state.fill == "rescale":
            plan.unrecovered = state.ledger.unrecovered_counter(key, buf.device)
            if state.counts_resolved == "regenerate":  # c_j known here: fold W / c_j into pre
                counts = regenerated_counts(lost, state.peer_draws(record))
                plan.pre.mul_(arrival_factor(counts, plan.world, plan.unrecovered))
            else:
                wire = state.wire_dtype_for(buf)
                plan.counts = (~lost).to(torch.int32 if state.counts_resolved == "separate" else wire)
        if state.error_feedback:
            _feed_back(record, buf, lost)
    plan.post_lost = state.draw(state.post, record) if state.drops_after else None
    keep = post_keep(plan.post_lost, state.fill, record.post_factor)
    if keep is not None:
        if state.post_sync == "shared":  # b_j (R_j) = R_j computed from b_j-scaled copies
            plan.pre = keep if plan.pre is None else plan.pre.mul_(keep)
        else:
            plan.post = keep


def _feed_back(record: BucketRecord, buf: torch.Tensor, lost: torch.Tensor) -> None:
    """Error feedback: this rank sends ``c = g + e`` (``e``: what its uplink lost last time
    for this bucket, 0 at first) and keeps ``e <- c`` on the packets lost now (0 elsewhere),
    so over ``T`` steps what arrived plus ``e`` is exactly the sum of its gradients."""
    if record.residual is None:
        record.residual = torch.zeros_like(buf)
    else:
        buf.add_(record.residual)
    # select the lost packets of c (a non-finite one, an overflow a GradScaler will skip, is
    # not kept: selection, so inf never becomes nan in the other packets)
    record.residual.zero_()
    record.layout.fill_from_(record.residual, lost & record.layout.finite_packets(buf), buf)


def _to_wire(state: LossyState, plan: _Plan, buf: torch.Tensor, scale: float) -> torch.Tensor:
    """What travels: ``buf`` itself, or its Hadamard rotation and/or its copy in the wire
    dtype (then ``plan`` keeps what :func:`_finish` needs to decode into ``buf``). The
    per-packet factor is applied before the cast to a narrower wire dtype, so ``1/(1-p)`` and
    ``W/c_j`` are not rounded to fp16/bf16 (a bias of up to 0.2% in bf16)."""
    x = buf
    if state.encoding == "hadamard":
        assert state.rotation.generator is not None
        x, plan.signs = encode(buf, state.hadamard_block, state.rotation.generator)
        plan.block = state.hadamard_block
    _scale_before_collective(x, plan.layout, plan.pre, scale)
    dtype = state.wire_dtype_for(buf)
    wire = x.to(dtype) if x.dtype != dtype else x
    if wire is not buf:
        plan.bucket = buf
    return wire


def _finish(plan: _Plan, results: list[torch.Tensor]) -> torch.Tensor:
    """The callback: widen a narrow wire dtype (into DDP's buffer, or to the rotation's dtype
    for a rotated bucket), ``W/c_j`` from the summed counts and the independent post mask in one pass, the
    stale fill (by selection), the inverse rotation into DDP's buffer, and the fidelity sums.
    Compute only."""
    numel = plan.layout.numel
    out = results[0][:numel] if plan.appended else results[0]
    arrivals = results[0][numel:] if plan.appended else results[1] if plan.counts is not None else None
    if plan.bucket is not None:  # widen a narrow wire dtype before any factor or fill
        if plan.signs is not None:  # to the rotation's dtype (fp32; fp64 for an fp64 bucket)
            out = out.to(rotation_dtype(plan.bucket.dtype))
        else:
            out = plan.bucket.copy_(out)
    factor = plan.post
    if plan.counts is not None:
        assert plan.unrecovered is not None and arrivals is not None
        rescale = arrival_factor(arrivals, plan.world, plan.unrecovered)
        factor = rescale if factor is None else factor.mul_(rescale)
    if factor is not None:
        plan.layout.scale_(out, factor)
    if plan.stale is not None:
        stale_fill_(plan.layout, out, plan.post_lost, plan.stale)
    if plan.signs is not None:  # x = D Q y, then back into DDP's buffer
        assert plan.bucket is not None
        out = decode_(plan.bucket, out, plan.signs, plan.block)
    if plan.fidelity_slot is not None:
        plan.fidelity_slot.copy_(_fidelity_sums(out, results[-1]))
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
    plan = _Plan(record.layout, state.world_size)
    if state.measure_fidelity:  # the lossless reference: the scaled bucket before any loss
        if scale != 1.0:
            buf.mul_(scale)
            scale = 1.0
        plan.clean = buf.clone()
        plan.fidelity_slot = state.ledger.fidelity_slot(step, buf.device)
    _plan_masks(state, record, plan, buf)
    wire = _to_wire(state, plan, buf, scale)

    plan.appended = plan.counts is not None and state.counts_resolved == "append"
    futures = [_allreduce(torch.cat((wire, plan.counts)) if plan.appended else wire, group)]  # type: ignore[arg-type]
    if plan.counts is not None and not plan.appended:
        futures.append(_allreduce(plan.counts, group))
    if plan.clean is not None:
        futures.append(_allreduce(plan.clean, group))
    if state.fill == "stale":  # kept in the bucket's dtype (no stale fill with an encoding)
        plan.stale = state.buckets.stale_buffer(record, buf)
    return _join(futures, buf.is_cuda, functools.partial(_finish, plan), plan.read_in_callback())

r"""The packet pipeline of an all-reduce: one flat buffer through the per-packet path.

``all_reduce(state, buf, group, lookup, scale, ends_step)`` is what the DDP hook does to a
gradient bucket and what the lossy process group does to an ``all_reduce`` of its own:

1. the simulated network's tick (``state.clock``: this collective's arrivals and times);
2. the loss masks of this call (``LossyState.draw_masks``: loss model, placement, FEC,
   retransmission and protection, counted in the ledger);
3. the technique chain before the wire (fidelity, error feedback, encoding, the fill,
   the wire dtype: ``b_k(...b_1(g))``);
4. the real collective (the placement's ``all_reduce`` over ``group``, plus any tensor a
   technique reduces on its own), launched here, never from a callback;
5. the chain after the collective in reverse order (``a_1(...a_k(C))``), in the returned
   future's callback, which only computes.

``scale`` is the factor this rank's copy takes before the sum (``1/W`` of a mean, ``1`` of a
sum): with loss 0 the result is ``sum_r scale * g_r`` exactly, the collective's own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lossy_hooks.core.pipeline.chain import after_collective, before_collective
from lossy_hooks.core.techniques import BucketCall

if TYPE_CHECKING:
    from lossy_hooks.core.buckets import BucketRecord
    from lossy_hooks.core.state import LossyState

__all__ = ["all_reduce", "join", "plain_all_reduce"]


def join(
    futures: list[torch.futures.Future],
    on_cuda: bool,
    fn: Callable[[list[torch.Tensor]], torch.Tensor],
    read_in_callback: tuple[torch.Tensor | None, ...] = (),
) -> torch.futures.Future[torch.Tensor]:
    """One future for all collectives the pipeline launched, then ``fn`` on their results.

    All collectives are launched in the caller's body (never from a callback). On CUDA/NCCL
    the work futures complete at enqueue and ``wait()`` only orders streams, so chaining on
    the first (CUDA-aware) future keeps DDP's stream synchronisation; on CPU/Gloo they
    complete on worker threads and ``collect_all`` waits for all of them.

    The stream rule (CUDA): a callback runs on a stream of its own. The futures' values are
    recorded on it by the future itself; every *other* tensor the callback reads that was
    made on the caller's stream (``read_in_callback``: masks, factors, counts, stale buffers,
    counters) is ``record_stream``-ed on the callback's stream before it is read, so the
    caching allocator cannot hand its memory to a new tensor until the callback's kernels
    have run, even after the caller's last reference to it is gone.
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


def _sum(tensor: torch.Tensor, group: Any) -> torch.futures.Future:
    return dist.all_reduce(tensor, group=group, async_op=True).get_future()


def plain_all_reduce(buf: torch.Tensor, group: Any, scale: float) -> torch.futures.Future[torch.Tensor]:
    """The lossless all-reduce (``passthrough``, control traffic): ``sum_r scale * g_r``, as
    DDP's reducer computes it (a multiply by the scalar, then the sum: bitwise DDP at any W)."""
    if scale != 1.0:
        buf.mul_(scale)
    return join([_sum(buf, group)], buf.is_cuda, lambda r: r[0])


def all_reduce(
    state: LossyState,
    buf: torch.Tensor,
    group: Any,
    lookup: Callable[[], BucketRecord],
    scale: float,
    ends_step: bool,
) -> tuple[torch.futures.Future[torch.Tensor], BucketCall | None]:
    """``buf`` through the pipeline (see the module); returns the future of the result and
    the call (its masks, for a caller that counts them; ``None`` under ``passthrough``).
    ``lookup`` gives the buffer's record (packets, stale buffer, ...), ``ends_step`` says
    whether this call is the last of a training step (the step counter moves after it)."""
    state.prepare(buf, group)
    state.bucket_calls += 1
    if state.passing_through:
        return plain_all_reduce(buf, group, scale), None
    record = lookup()
    step = state.steps
    if ends_step:
        state.steps += 1
    if state.clock is not None:  # the simulated network: this collective's arrivals and times
        n = record.layout.num_packets
        state.clock.tick(n, record.wire_bytes, record.wire_bytes / n)
    assert state.world_size is not None
    call = BucketCall(state, record, buf, state.world_size, scale, step)
    state.draw_masks(call)  # where the placement loses: this rank's masks, counted
    main = before_collective(call)  # fidelity, error feedback, encoding, the fill, wire dtype
    # the buffer through the placement's collective; counts and the reference arrive whole
    futures = [state.placement.all_reduce(main, group), *(_sum(t, group) for t, _ in call.extra)]
    return join(futures, buf.is_cuda, functools.partial(after_collective, call), tuple(call.kept)), call

r"""A lossy process group: every data collective of a group carries packet loss.

Two lines in existing training code, whatever its parallelism::

    from lossy_hooks import LossyState, lossy_group
    pg = lossy_group(LossyState(loss_rate=0.01, fill="zero"), kinds=("p2p",))  # pipeline traffic
    ...  # use pg wherever torch takes a group: DDP(process_group=pg), DeviceMesh.from_group(pg, ...),
    ...  # PipelineStage(..., group=pg), dist.all_to_all_single(..., group=pg), funcol.*(..., pg)

:func:`lossy_group` returns a real, registered ``torch.distributed.ProcessGroup`` whose
backend (a Python subclass of c10d's ``Backend``) wraps the backend of ``group`` (Gloo or
NCCL) and sends every collective of the chosen ``kinds`` through the packet pipeline
(:mod:`lossy_hooks.core.pipeline`); the real collective of the wrapped group carries the
values. The functional collectives (``torch.ops._c10d_functional``, which DTensor, FSDP2
and ``torch.compile`` call) reach the same methods. The kinds and what a lost packet is:

- ``"all_reduce"`` (``all_reduce``, the coalesced form; ops SUM and AVG): the DDP hook's
  semantics on the buffer (every drop point, fill, placement and technique; AVG is the
  hook's ``reduction="mean"``, SUM its ``"sum"``), its packets keyed by kind, size and dtype;
- ``"reduce_scatter"`` (``reduce_scatter_tensor``, the list and coalesced forms; SUM, AVG):
  FSDP's reduce-scatter (:mod:`lossy_hooks.fsdp`);
- ``"all_gather"`` (``all_gather_into_tensor``, the list and coalesced forms),
  ``"all_to_all"`` (``all_to_all_single`` with even or uneven splits, ``all_to_all``),
  ``"broadcast"`` and ``"p2p"`` (``send``/``recv``/``isend``/``irecv``/``batch_isend_irecv``):
  delivered, not reduced (:mod:`lossy_hooks.core.pipeline.delivery`): each packet from
  another rank is lost at its receiver, zero or stale.

Never lost (control traffic): ``barrier``; tensors of integer or bool dtype (object
collectives, sizes, token indices, counts); all-reduces and reduce-scatters with MAX, MIN,
PRODUCT or bitwise ops (a lost packet of a maximum has no agreed meaning); ``scatter``,
``gather`` and ``reduce`` (set-up collectives, carried as they are); anything inside
:func:`~lossy_hooks.core.process_group.reliable` (this package's own statistics use it; so
can a user, e.g. around ``DDP(...)`` and ``parallelize_module``, whose start-up broadcasts
are ``"broadcast"`` traffic otherwise); everything under ``state.passthrough()``.

Refused before any collective, naming the setting: an unknown kind; ``fill="rescale"``
with a delivered kind (nothing is summed: there is no copy to average); a deadline loss model
with a delivered kind (the simulated clock prices all-reduces); ``link_loss`` with a delivered
kind (deliveries honour ``ranks_per_node`` only); ``reduction="sum"`` (the op of each call
says it); with ``"reduce_scatter"``, what FSDP's reduce-scatter refuses; and, in the DDP hook,
a lossy group that already loses ``all_reduce`` (the loss would apply twice).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend as C10dBackend
from torch._C._distributed_c10d import Work, _create_work_from_future

from lossy_hooks.core.pipeline import all_reduce as pipeline_all_reduce
from lossy_hooks.core.pipeline.delivery import DELIVERY_KINDS, Chunk
from lossy_hooks.core.pipeline.sharded import Counted, ShardedCollectives, sharded_refusal
from lossy_hooks.core.process_group import LOSSY_GROUPS, lossy_kinds, reliable_now
from lossy_hooks.core.state import LossyState

__all__ = ["KINDS", "LossyBackend", "check_backend", "check_group_state", "lossy_group", "lossy_subgroups"]

KINDS = ("all_reduce", "reduce_scatter", *DELIVERY_KINDS)
_PENDING: list[tuple[LossyState, dist.ProcessGroup, frozenset[str]]] = []
_REGISTERED: set[str] = set()


def check_group_state(state: LossyState, kinds: Iterable[str] | None) -> frozenset[str]:
    """The kinds (default: every kind of :data:`KINDS`), checked against ``state``: raises
    ``ValueError`` naming the setting (see the module) before any collective runs."""
    chosen = frozenset(KINDS if kinds is None else ([kinds] if isinstance(kinds, str) else kinds))
    unknown = sorted(chosen - set(KINDS))
    if unknown or not chosen:
        raise ValueError(f"lossy_group: kinds must be among {', '.join(KINDS)}; got {sorted(chosen)}")
    why = state.settings.group_refusal(chosen)  # the settings' declared refusals (LossConfig)
    if why is not None:
        raise ValueError(f"lossy_group: {why}")
    if "reduce_scatter" in chosen:
        why = sharded_refusal(state, "reduce-scatter")
        if why is not None:
            raise ValueError(f"lossy_group {why}")
    return chosen


def check_backend(backend: str) -> str:
    """The wrapped group's backend, lower-case, if it can be wrapped (Gloo or NCCL: the two
    whose every collective the pipeline was tested on, Gloo here and NCCL by design); else
    ``ValueError`` naming it."""
    name = backend.lower()
    if name not in ("gloo", "nccl"):
        raise ValueError(f"lossy_group wraps a Gloo or an NCCL group; this group's backend is {backend!r}")
    return name


def lossy_group(
    state: LossyState, group: dist.ProcessGroup | None = None, kinds: Iterable[str] | None = None
) -> dist.ProcessGroup:
    """A process group over the ranks of ``group`` (default: the world) whose collectives of
    ``kinds`` lose packets as ``state`` says (see the module). Like ``dist.new_group``, every
    rank of the world calls it, in the same order. ``state`` serves this group only; its
    ``stats(all_ranks=True)`` sums over ``state.process_group`` (give the state
    ``process_group=group`` for a sub-group)."""
    if not dist.is_initialized():
        raise RuntimeError("lossy_group: call torch.distributed.init_process_group first")
    inner = group if group is not None else dist.group.WORLD
    chosen = check_group_state(state, kinds)
    if lossy_kinds(inner):
        raise ValueError(
            "lossy_group: the group is a lossy_group already (its losses would apply twice): wrap the "
            "plain group it was made from, with every kind that should lose"
        )
    backend = check_backend(str(dist.get_backend(inner)))
    return _wrap(state, inner, dist.get_process_group_ranks(inner), chosen, backend)


def lossy_subgroups(
    state: LossyState, rank_lists: Sequence[Sequence[int]], kinds: Iterable[str] | None = None
) -> dist.ProcessGroup:
    """This rank's lossy group among the disjoint groups of ``rank_lists`` (global ranks: one
    dimension of a ``DeviceMesh``; ``DeviceMesh.from_group`` builds it, with other
    ``mesh_dim_names`` than an earlier mesh over the same ranks, which DTensor would take for
    it, measured on torch 2.14), each wrapping a plain group of the world's backend made here.
    Every rank calls it with the same lists; ``state`` serves this rank's group, and its
    ``stats(all_ranks=True)`` sums over the world (the whole traffic of that dimension)."""
    chosen, rank = check_group_state(state, kinds), dist.get_rank()
    flat = sorted(r for ranks in rank_lists for r in ranks)
    if (
        len(set(flat)) != len(flat)
        or not 0 <= flat[0] <= flat[-1] < dist.get_world_size()
        or rank not in flat
    ):
        raise ValueError(f"lossy_subgroups: disjoint lists of ranks holding rank {rank}, got {rank_lists}")
    backend = check_backend(str(dist.get_backend()))
    groups = [
        _wrap(state, dist.new_group(list(r), backend=backend), list(r), chosen, backend) for r in rank_lists
    ]
    return next(g for g, ranks in zip(groups, rank_lists, strict=True) if rank in ranks)


def _wrap(
    state: LossyState, inner: Any, ranks: list[int], chosen: frozenset[str], backend: str
) -> dist.ProcessGroup:
    """The lossy group over ``ranks`` wrapping ``inner`` (called by every rank of the world;
    the backend is created, with ``inner``, on the members only)."""
    name = f"lossy_{backend}"
    if name not in _REGISTERED:
        devices = ["cuda"] if backend == "nccl" else ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
        dist.Backend.register_backend(name, _create, devices=devices)
        _REGISTERED.add(name)
    _PENDING.append((state, inner, chosen))
    try:
        lossy = dist.new_group(ranks=ranks, backend=name)
    finally:
        _PENDING.clear()
    if lossy is not None and lossy != dist.GroupMember.NON_GROUP_MEMBER:
        LOSSY_GROUPS[lossy.group_name] = chosen
    return lossy


def _create(store: Any, rank: int, size: int, timeout: Any) -> LossyBackend:
    state, inner, kinds = _PENDING[-1]
    return LossyBackend(state, inner, kinds, rank, size)


def _done(result: Any) -> Work:
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(result)
    return _create_work_from_future(future)


class _FinishOnWait(Work):
    """A work whose result needs the receiver's fill once the real work completed: ``wait``
    waits for it, then runs ``finish`` (once)."""

    def __init__(self, inner: Work, finish: Callable[[], None], result: Any) -> None:
        super().__init__()
        self.inner, self.finish, self.result_value = inner, finish, result
        self.lock, self.finished = threading.Lock(), False

    def wait(self, timeout: Any = None) -> bool:
        self.inner.wait()
        with self.lock:
            if not self.finished:
                self.finished = True
                self.finish()
        return True

    def is_completed(self) -> bool:
        return self.finished

    def get_future(self) -> torch.futures.Future:
        self.wait()
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(self.result_value)
        return future


def _summing(op: Any) -> bool:
    """SUM or AVG: the reductions that lose (a ``ReduceOp`` equals its type, but is not ``in``
    a tuple of them)."""
    return bool(op == dist.ReduceOp.SUM or op == dist.ReduceOp.AVG)


def _lossy_tensor(t: torch.Tensor) -> bool:
    """Data traffic: a floating-point (or complex) tensor; integers and bools are control."""
    return t.is_floating_point() or t.is_complex()


class LossyBackend(C10dBackend):
    """The backend of a :func:`lossy_group`: each method of c10d's ``Backend`` that carries
    data sends it through the packet pipeline over the wrapped group (``self.inner``), or
    forwards it unchanged (control traffic, kinds not chosen)."""

    def __init__(
        self, state: LossyState, inner: dist.ProcessGroup, kinds: frozenset[str], rank: int, size: int
    ) -> None:
        super().__init__(rank, size)
        self.state, self.inner, self.kinds = state, inner, kinds
        self.sharded = ShardedCollectives(state, 0)
        self.labels: dict[str, int] = {}

    def getBackendName(self) -> str:
        return "lossy"

    @property
    def supports_coalescing(self) -> bool:
        return False  # batch_isend_irecv issues each message on its own

    def _backend(self, device: torch.device) -> Any:
        return self.inner._get_backend(device)

    def _loses(self, kind: str, *tensors: torch.Tensor) -> bool:
        return (
            kind in self.kinds
            and not reliable_now()
            and not self.state.passing_through
            and all(_lossy_tensor(t) for t in tensors)
        )

    def _label(self, kind: str, buf: torch.Tensor) -> tuple[str, int]:
        """A reduced buffer's label (its kind, size and dtype: one record, one stale buffer per
        label) and its record index (``-1, -2, ...``: apart from DDP's buckets and FSDP's
        units), stable across a resume through the ledger's labels."""
        label = f"{kind} {buf.numel()} {str(buf.dtype).removeprefix('torch.')}"
        index = self.labels.get(label)
        if index is None:
            saved = [k[0] for k, e in self.state.ledger.buckets.items() if e.label == label]
            used = {k[0] for k in self.state.ledger.buckets} | set(self.labels.values())
            index = saved[0] if saved else min([0, *used]) - 1
            self.labels[label] = index
        return label, index

    # -- reductions -------------------------------------------------------------------------

    def allreduce(self, tensors: list[torch.Tensor], opts: Any) -> Work:
        tensor = tensors[0]
        if not (self._loses("all_reduce", tensor) and _summing(opts.reduceOp)):
            return self._backend(tensor.device).allreduce(tensors, opts)
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)
        scale = 1.0 / self.size() if opts.reduceOp == dist.ReduceOp.AVG else 1.0
        label, index = self._label("all_reduce", flat)
        records = self.state.buckets

        def lookup() -> Any:
            return records.flat_record(index, label, flat)

        future, call = pipeline_all_reduce(self.state, flat, self.inner, lookup, scale, False)
        if call is not None:
            n, nbytes = call.record.layout.num_packets, call.record.wire_bytes
            points = self.state.ledger.points
            masks = (("worker", call.lost), ("post", call.post_lost))
            self._count("all_reduce", [(n, nbytes, mask) for point, mask in masks if point in points])

        def into_tensor(f: torch.futures.Future) -> list[torch.Tensor]:
            out = f.value()
            if out.data_ptr() != flat.data_ptr():
                flat.copy_(out.view(-1))
            if flat.data_ptr() != tensor.data_ptr():
                tensor.copy_(flat.view_as(tensor))
            return [tensor]

        return _create_work_from_future(future.then(into_tensor))

    def _count(self, kind: str, counted: Counted) -> None:
        """One call of ``kind``, from what the pipeline counted per drop point."""
        masks = [m.reshape(-1) for _, _, m in counted if m is not None]
        packets, nbytes = sum(c[0] for c in counted), sum(c[1] for c in counted)
        self.state.ledger.count_collective(kind, packets, nbytes, torch.cat(masks) if masks else None)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any) -> Work:
        single = dist.AllreduceOptions()
        single.reduceOp = opts.reduceOp
        works = [self.allreduce([t], single) for t in tensors]
        for w in works:
            w.wait()
        return _done(tensors)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any) -> Work:
        if not (self._loses("reduce_scatter", input) and _summing(opts.reduceOp)):
            return self._backend(input.device).reduce_scatter_single(output, input, opts)
        label, index = self._label("reduce_scatter", input)
        records = self.state.buckets
        counted = self.sharded.reduce_scatter(
            output,
            input,
            self.inner,
            opts.reduceOp,
            lambda rows, post: records.shard_record(index, label, rows, post),
        )
        self._count("reduce_scatter", counted)
        return _done([output])

    def reduce_scatter(
        self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any
    ) -> Work:
        output, rows = outputs[0], inputs[0]
        if not (self._loses("reduce_scatter", output) and _summing(opts.reduceOp)):
            return self._backend(output.device).reduce_scatter(outputs, inputs, opts)
        flat = torch.cat([r.reshape(-1) for r in rows])
        single = output if output.is_contiguous() else output.contiguous()
        self.reduce_scatter_single(single, flat, opts).wait()
        if single is not output:
            output.copy_(single)
        return _done(outputs)

    def reduce_scatter_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any
    ) -> Work:
        for output, input in zip(outputs, inputs, strict=True):
            self.reduce_scatter_single(output, input, opts).wait()
        return _done(outputs)

    # -- deliveries -------------------------------------------------------------------------

    def _receive(self, kind: str, out: torch.Tensor, chunks: list[Chunk], key: str) -> None:
        self.state.prepare(out, self.inner)
        self.state.delivery.receive_(kind, out, chunks, key, self.rank())

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any) -> Work:
        work = self._backend(output.device).all_gather_single(output, input, opts)
        if not self._loses("all_gather", output):
            return work
        work.wait()
        m = input.numel()
        chunks = [(j, m) for j in range(self.size())]
        self._receive("all_gather", output, chunks, f"all_gather {m} {output.dtype}")
        return _done([output])

    def all_gather_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any
    ) -> Work:
        for output, input in zip(outputs, inputs, strict=True):
            self.all_gather_single(output, input, opts).wait()
        return _done(outputs)

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any) -> Work:
        work = self._backend(inputs[0].device).allgather(outputs, inputs, opts)
        if not self._loses("all_gather", inputs[0]):
            return work
        work.wait()
        m = inputs[0].numel()
        for sender, received in enumerate(outputs[0]):
            if sender != self.rank():  # a row per sender: its own key, so stale rows stay apart
                self._receive(
                    "all_gather", received, [(sender, m)], f"all_gather[{sender}] {m} {received.dtype}"
                )
        return _done(outputs)

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        out_splits: list[int],
        in_splits: list[int],
        opts: Any,
    ) -> Work:
        work = self._backend(output.device).all_to_all_single(output, input, out_splits, in_splits, opts)
        if not self._loses("all_to_all", output):
            return work
        work.wait()
        world = self.size()
        row = math.prod(output.shape[1:])  # elements per first-dimension index (a token)
        if out_splits:
            sizes = [s * row for s in out_splits]
        else:
            sizes = [output.numel() // world] * world
        chunks = list(enumerate(sizes))
        self._receive("all_to_all", output, chunks, f"all_to_all {tuple(sizes)} {output.dtype}")
        return _done([output])

    def alltoall(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any) -> Work:
        work = self._backend(outputs[0].device).alltoall(outputs, inputs, opts)
        if not self._loses("all_to_all", *outputs):
            return work
        work.wait()
        for sender, received in enumerate(outputs):
            if sender != self.rank():
                m = received.numel()
                self._receive(
                    "all_to_all", received, [(sender, m)], f"all_to_all[{sender}] {m} {received.dtype}"
                )
        return _done(outputs)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any) -> Work:
        work = self._backend(tensors[0].device).broadcast(tensors, opts)
        if not self._loses("broadcast", *tensors) or opts.rootRank == self.rank():
            return work
        work.wait()
        for i, t in enumerate(tensors):
            m = t.numel()
            self._receive(
                "broadcast", t, [(opts.rootRank, m)], f"broadcast[{opts.rootRank}:{i}] {m} {t.dtype}"
            )
        return _done(tensors)

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> Work:
        return self._backend(tensors[0].device).send(tensors, dst, tag)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> Work:
        work = self._backend(tensors[0].device).recv(tensors, src, tag)
        if not self._loses("p2p", *tensors):
            return work

        def finish() -> None:
            for t in tensors:
                m = t.numel()
                self._receive("p2p", t, [(src, m)], f"p2p[{src}:{tag}] {tuple(t.shape)} {t.dtype}")

        return _FinishOnWait(work, finish, tensors)

    # -- control traffic, carried as it is ----------------------------------------------------

    def barrier(self, opts: Any) -> Work:
        # the wrapped group's barrier device: the GPU of an NCCL group, the CPU of a Gloo one
        nccl = "nccl" in str(dist.get_backend(self.inner)).lower()
        return self._backend(torch.device("cuda" if nccl else "cpu")).barrier(opts)

    def scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any) -> Work:
        return self._backend(outputs[0].device).scatter(outputs, inputs, opts)

    def gather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any) -> Work:
        return self._backend(inputs[0].device).gather(outputs, inputs, opts)

    def reduce(self, tensors: list[torch.Tensor], opts: Any) -> Work:
        return self._backend(tensors[0].device).reduce(tensors, opts)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int) -> Work:
        return self._backend(tensors[0].device).recv_anysource(tensors, tag)

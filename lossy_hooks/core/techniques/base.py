r"""The interface every technique implements, and the one call it works on.

A *technique* is one thing a transport or a training system does about packet loss (a fill,
an encoding, a wire dtype, error feedback, a fidelity measurement, FEC and retransmission).
It answers four questions, and nothing else in the package asks them of it:

* :meth:`Technique.refuses`: which settings it cannot work with (the reason, raised as a
  ``ValueError`` by :class:`~lossy_hooks.core.options.LossConfig` before any work);
* :meth:`Technique.before_wire`: what it does to this rank's copy of a bucket before the
  collective (it may replace what travels, ``x -> x'``);
* :meth:`Technique.after_collective`: what it does to the collective's result;
* :attr:`Technique.counters`: the counters it adds to ``LossyState.stats()``.

The DDP hook runs the chain of :func:`~lossy_hooks.core.techniques.wire_chain` in order
before the wire and in reverse order after the collective, so each technique undoes its own
transform with everything applied after it already undone:
``out = a_1(a_2(...a_k(C(b_k(...b_1(g))))))``, ``b_i``/``a_i`` the technique's
before/after maps and ``C`` the collective.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from lossy_hooks.core.buckets import BucketRecord, BucketRecords
    from lossy_hooks.core.ledger import PacketLedger
    from lossy_hooks.core.options import LossConfig
    from lossy_hooks.core.streams import DropSite

__all__ = ["BucketCall", "Technique", "TechniqueContext"]


class TechniqueContext(Protocol):
    """What a technique may read of the state that runs it, and nothing more (a
    :class:`~lossy_hooks.LossyState` is one): the ledger (fidelity slots, unrecovered
    counters), the bucket records (stale buffers), the chain itself (the callback runs it in
    reverse), the Hadamard signs' stream, the counts transport in effect, the replayed
    peers' draws and the wire dtype."""

    ledger: PacketLedger
    buckets: BucketRecords
    techniques: tuple[Technique, ...]
    counts_resolved: str | None

    @property
    def rotation(self) -> DropSite: ...

    def peer_draws(self, record: BucketRecord) -> list[tuple[int, Callable[[int], torch.Tensor | None]]]: ...

    def wire_dtype_for(self, buf: torch.Tensor) -> torch.dtype: ...


@dataclass(eq=False)
class BucketCall:
    """One call of the packet pipeline on one buffer (a DDP bucket, a lossy group's
    all-reduce, a reduce-scatter's rows): what the techniques of the chain read and leave
    for their :meth:`~Technique.after_collective` (everything on the buffer's device).

    ``bucket``: what this rank contributes: a flat buffer (an all-reduce, ``rows = 1``) or
    the ``(W, L)`` rows of a reduce-scatter (``rows = W``, row ``j`` bound for rank ``j``);
    ``result``: where the result lands (the bucket itself for an all-reduce; the
    reduce-scatter's output, row ``row`` of the reduction, ``L`` elements); ``lost``: this
    rank's loss mask before the collective (``(n,)``, or ``(W, n)`` over the rows, own row
    never lost), ``post_lost``: the result's (``(n,)``), ``True`` = lost, ``None`` where
    nothing can be lost; ``post_factor`` and, on a per-hop placement, the arrival counts
    ``arrivals`` (shaped like ``lost``); ``scale``: the ``1/W`` of a mean not yet applied
    (``1`` when the collective averages); ``memo``: each technique's own per-call values, by
    its name."""

    state: TechniqueContext  # what a technique may read of its state
    record: BucketRecord
    bucket: torch.Tensor  # what this rank contributes (DDP's buffer: what the hook returns into)
    world: int
    scale: float
    step: int
    result: torch.Tensor | None = None  # where the result lands (None: the bucket)
    rows: int = 1  # rows of the bucket, one per destination rank (a reduce-scatter: W)
    row: int = 0  # the result's row: this rank's (a reduce-scatter), 0 for an all-reduce
    lost: torch.Tensor | None = None
    post_lost: torch.Tensor | None = None
    post_factor: float | torch.Tensor = 1.0  # post rescale 1/q (per packet on a per-hop placement)
    arrivals: torch.Tensor | None = None  # c_j where known before the collective (per-hop placements)
    appended: torch.Tensor | None = None  # travels in the bucket's own collective, after it
    appended_result: torch.Tensor | None = None  # its summed value, after the collective
    # reduced by collectives of their own: (tensor, like_payload) where like_payload means
    # "with the bucket's own reduction" (a reference), else summed (counts)
    extra: list[tuple[torch.Tensor, bool]] = field(default_factory=list)
    results: list[torch.Tensor] = field(default_factory=list)  # [main, *extra] once reduced
    kept: list[torch.Tensor] = field(default_factory=list)  # read by the callback (CUDA streams)
    memo: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.result is None:
            self.result = self.bucket

    def reduce_also(self, tensor: torch.Tensor, like_payload: bool = False) -> int:
        """Reduce ``tensor`` (shaped like the bucket) over the ranks in a collective of its
        own, launched with the bucket's, of the same kind (all-reduce, reduce-scatter): a
        sum, or with ``like_payload`` the bucket's own reduction (a lossless reference). Its
        result is ``results[index]`` after the collective."""
        self.extra.append((tensor, like_payload))
        return len(self.extra)

    def append_to_bucket(self, tensor: torch.Tensor) -> None:
        """Send ``tensor`` (the wire dtype) after the bucket in the bucket's own collective;
        its sum is ``appended_result`` after it."""
        if self.appended is not None:
            raise RuntimeError("one tensor can travel appended to a bucket")
        self.appended = tensor

    def keep_alive(self, *tensors: torch.Tensor | None) -> None:
        """Tensors made before the collective that :meth:`Technique.after_collective` reads:
        on CUDA the callback's stream records them (see ``core.pipeline.join``)."""
        self.kept.extend(t for t in tensors if t is not None)


class Technique(ABC):
    """One technique (see the module): ``name`` is the value of its setting that selects it."""

    name: ClassVar[str]
    counters: ClassVar[tuple[str, ...]] = ()  # the keys it adds to each bucket of stats()

    def __init__(self, config: LossConfig) -> None:
        self.config = config

    @classmethod
    @abstractmethod
    def used_by(cls, config: LossConfig) -> bool:
        """Whether ``config`` asks for this technique."""

    @classmethod
    def refuses(cls, config: LossConfig) -> str | None:
        """Why ``config`` (which uses this technique) has no meaning, or ``None``."""
        return None

    def before_wire(self, call: BucketCall, x: torch.Tensor) -> torch.Tensor:
        """This rank's copy on its way to the collective: ``x`` (the bucket, or what an
        earlier technique made of it) -> what travels on."""
        return x

    def after_collective(self, call: BucketCall, out: torch.Tensor) -> torch.Tensor:
        """The collective's result on its way back to DDP: ``out`` -> what goes on."""
        return out

r"""What a lost packet becomes: the fills ``zero``, ``rescale`` and ``stale``, and the
per-packet rules they are made of, written once for the DDP hook and the FSDP collectives.

To these rules a DDP bucket and an FSDP shard set are the same thing: ``rows x n`` packets
of one :class:`~lossy_hooks.core.packetization.PacketLayout` (a DDP bucket is one row; an
FSDP reduce-scatter input or all-gather output is ``W`` rows, row ``j`` bound for or coming
from rank ``j``, a packet never crossing a row). Masks are bool tensors of that shape
(``True`` = lost), factors fp32 tensors of it. ``a_{r,j} = 1`` when rank ``r``'s copy of
packet ``j`` arrives, ``c_j = sum_r a_{r,j}``, ``b_j = 1`` when packet ``j`` of the result
arrives.

- every fill, worker drop: the copy is multiplied by ``a_{r,j}`` before the collective
  (:meth:`Fill.worker_keep`), with the ``1/W`` of a mean in the same pass
  (:func:`scale_before_collective`);
- ``zero``: a lost packet counts as 0; post drop: ``b_j R_j``;
- ``rescale``: worker drop ``f_j = W / c_j`` (:func:`arrival_factor`; ``0`` where no copy
  arrived, counted as unrecovered), from counts summed by a collective or replayed from the
  peers' generators (:func:`regenerated_counts`; for shard rows each peer's own row is never
  lost, :func:`insert_own_row`); post drop ``b_j R_j / q``, ``q`` the loss model's expected
  kept fraction (:func:`post_rescale_factor`);
- ``stale`` (post drop only): a lost packet takes the last finite value received for it (by
  selection: received packets are never touched), and the stale buffer takes every
  received finite packet (:func:`stale_fill_`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lossy_hooks.core.packetization import PacketLayout
from lossy_hooks.core.techniques.base import BucketCall, Technique

if TYPE_CHECKING:
    from lossy_hooks.core.options import LossConfig

Mask = torch.Tensor | None  # a loss mask (True = lost), or None where nothing can be lost

__all__ = [
    "Fill",
    "RescaleFill",
    "StaleFill",
    "ZeroFill",
    "arrival_factor",
    "insert_own_row",
    "post_rescale_factor",
    "regenerated_counts",
    "scale_before_collective",
    "stale_fill_",
]


def arrival_factor(
    arrivals: torch.Tensor, world: int, unrecovered: torch.Tensor | None = None
) -> torch.Tensor:
    """Worker rescale: ``W / c_j`` per packet from the arrival counts ``c_j`` (any shape),
    and ``0`` where no copy arrived (``c_j = 0``), those packets added to the
    ``unrecovered`` counter when one is given (shard rows always hold the owner's copy)."""
    c = arrivals.float()
    if unrecovered is not None:
        unrecovered.add_((c == 0).sum())
    return torch.where(c > 0, world / c.clamp_min(1.0), 0.0)


def insert_own_row(net: torch.Tensor, row: int) -> torch.Tensor:
    """``(W-1, n)`` masks of the shard rows a rank sends or receives -> ``(W, n)``: its own
    row ``row`` never crosses the network, so it is never lost."""
    own = torch.zeros((1, net.shape[1]), dtype=net.dtype, device=net.device)
    return torch.cat((net[:row], own, net[row:]))


def regenerated_counts(
    own_lost: torch.Tensor,
    peers: Iterable[tuple[int, Callable[[int], torch.Tensor | None]]],
    shard_rows: bool = False,
) -> torch.Tensor:
    """``c_j``: this rank's arrivals plus every other rank's, replayed (int32, the shape of
    ``own_lost``).

    ``peers``: ``(rank, draw)`` for every other rank, ``draw(m)`` the loss mask of ``m``
    packets from that rank's stream, through the same FEC, retransmission and protection
    as its own. A bucket (``own_lost`` of shape ``(n,)``) replays ``n`` packets per peer;
    shard rows (``(W, n)``, ``shard_rows=True``) replay the ``(W-1) n`` packets the peer
    sends, its own row inserted as received."""
    counts = (~own_lost).to(torch.int32)
    n = own_lost.shape[-1]
    for peer, draw in peers:
        if shard_rows:
            drawn = draw((own_lost.shape[0] - 1) * n)
            assert drawn is not None
            lost = insert_own_row(drawn.view(-1, n), peer)
        else:
            lost = draw(n)
            assert lost is not None
        counts += ~lost
    return counts


def post_rescale_factor(model: Any, packets: int, wire_bytes: int) -> float:
    """``1/q``: the post-rescale factor of a draw of ``packets`` packets carrying
    ``wire_bytes`` bytes, ``q`` the loss model's expected kept fraction
    (``LossModel.bucket_keep_fraction``); ``0`` when nothing is expected to arrive."""
    keep = model.bucket_keep_fraction(packets, wire_bytes)
    return 1.0 / keep if keep > 0 else 0.0


def stale_fill_(
    layout: PacketLayout, out: torch.Tensor, post_lost: torch.Tensor | None, stale: torch.Tensor
) -> None:
    """``fill="stale"`` on a received result, in place: a lost packet takes its stale value
    (by selection, so a received packet is never touched), then the stale buffer takes
    every received packet whose elements are all finite (an overflow never becomes the
    stale value)."""
    if post_lost is not None:
        layout.fill_from_(out, post_lost, stale)
    layout.fill_from_(stale, layout.finite_packets(out), out)


def _exact_factor(value: float, dtype: torch.dtype) -> bool:
    """Whether ``1/W`` may be folded into the fp32 per-packet factor (then cast to the bucket
    dtype) and still give exactly DDP's arithmetic, ``grad * (1/W)`` with the scalar in the
    op's compute precision: in fp32 always (``x * float32(1/W)`` both ways); in other dtypes
    only for ``W`` a power of two (``1/3`` as an fp32 factor cast to fp64 differs from the fp64
    ``1/3``; cast to bf16 it is ``0.33398``, a bias of ``2^-8`` on every element)."""
    return dtype == torch.float32 or math.frexp(value)[0] == 0.5


def scale_before_collective(
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


class Fill(Technique):
    """A fill: its rules (the methods the FSDP collectives call too) and, in the DDP chain,
    the loss itself: everything known before the collective and the same on every rank
    (``a_{r,j}``, ``W/c_j`` when replayed, a shared post mask and its factor) is one
    per-packet factor applied with ``1/W`` in one pass; what needs the result (summed
    counts, an independent post mask, the stale fill) is applied to it in one more."""

    needs_counts: ClassVar[bool] = False  # worker drop needs the arrival counts c_j
    keeps_stale: ClassVar[bool] = False  # keeps the last received value of every packet
    for_parameters: ClassVar[bool] = True  # can fill a lost packet of a parameter (all-gather)

    @classmethod
    def used_by(cls, config: LossConfig) -> bool:
        return config.fill == cls.name

    def worker_keep(self, lost: torch.Tensor) -> torch.Tensor:
        """``a_{r,j}``: the fp32 factor of this rank's copy before the collective."""
        return (~lost).float()

    def post_keep(self, post_lost: Mask, post_factor: float | torch.Tensor) -> Mask:
        """The fp32 factor of a post drop on the result (``None``: no mask, or not a factor)."""
        return None if post_lost is None else torch.where(post_lost, 0.0, 1.0)

    def fill_result_(self, layout: PacketLayout, out: torch.Tensor, post_lost: Mask, stale: Mask) -> None:
        """After the factors, on the result: nothing (the factors did it), or the stale fill."""

    def fill_received_(
        self, layout: PacketLayout, out: torch.Tensor, lost: torch.Tensor | None, stale: torch.Tensor | None
    ) -> None:
        """A received copy with no factor (an all-gather's parameters): lost packets zeroed."""
        if lost is not None:
            layout.zero_(out, lost)

    def before_wire(self, call: BucketCall, x: torch.Tensor) -> torch.Tensor:
        pre = None if call.lost is None else self._worker_factor(call, x, self.worker_keep(call.lost))
        keep = self.post_keep(call.post_lost, call.post_factor)
        if keep is not None:
            if self.config.shares_post_mask and call.rows == 1:  # b_j (R_j) = R_j of b_j-scaled copies
                pre = keep if pre is None else pre.mul_(keep)
            else:
                call.memo["post"] = keep
                call.keep_alive(keep)
        scale_before_collective(x, call.record.layout, pre, call.scale)
        return x

    def _worker_factor(self, call: BucketCall, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """The worker factor before the collective: ``a_{r,j}`` (the rescale adds ``W/c_j``)."""
        return pre

    def _result_factor(self, call: BucketCall) -> torch.Tensor | None:
        """The factor on the result: an independent post mask's (the rescale adds ``W/c_j``)."""
        return call.memo.get("post")

    def after_collective(self, call: BucketCall, out: torch.Tensor) -> torch.Tensor:
        factor = self._result_factor(call)
        if factor is not None:
            call.record.layout.scale_(out, factor)
        self.fill_result_(call.record.layout, out, call.post_lost, call.memo.get("stale"))
        return out


class ZeroFill(Fill):
    """``fill="zero"``: a lost packet counts as 0 (``R_j = sum_r s a_{r,j} g_{r,j}``; post
    drop ``b_j R_j``)."""

    name = "zero"


class RescaleFill(Fill):
    """``fill="rescale"``: the survivors are rescaled to an unbiased estimate (worker drop
    ``W/c_j``; post drop ``1/q``)."""

    name = "rescale"
    needs_counts = True
    for_parameters = False
    counters = ("packets_unrecovered",)

    @classmethod
    def refuses(cls, config: LossConfig) -> str | None:
        if config.drops_after and config.post_keep_rate <= 0.0:
            return (
                "fill='rescale' after the allreduce needs a long-run loss rate < 1 "
                f"(rescales survivors by 1/(1-p)); {config.loss_model.spec!r} loses every packet"
            )
        return None

    def post_keep(self, post_lost: Mask, post_factor: float | torch.Tensor) -> Mask:
        return None if post_lost is None else torch.where(post_lost, 0.0, post_factor)

    def _worker_factor(self, call: BucketCall, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """``a_{r,j} W / c_j`` with ``c_j`` replayed here, or ``a_{r,j}`` and the counts sent
        (int32 in a collective of their own, or in the wire dtype after the bucket)."""
        state, lost = call.state, call.lost
        assert lost is not None
        unrecovered = state.ledger.unrecovered_counter(call.record.key, x.device)
        if call.arrivals is not None:  # a per-hop placement: c_j known from the shared hops
            return pre.mul_(arrival_factor(call.arrivals, call.world, unrecovered))
        transport = state.counts_resolved
        if transport == "regenerate":  # c_j known here: fold W / c_j into pre
            counts = regenerated_counts(lost, state.peer_draws(call.record), shard_rows=call.rows > 1)
            return pre.mul_(arrival_factor(counts, call.world, unrecovered))
        sent = (~lost).to(torch.int32 if transport == "separate" else state.wire_dtype_for(call.bucket))
        index = None
        if transport == "append":
            call.append_to_bucket(sent)
        else:
            index = call.reduce_also(sent)
        call.memo["counts"] = (index, unrecovered)
        call.keep_alive(sent, unrecovered)
        return pre

    def _result_factor(self, call: BucketCall) -> torch.Tensor | None:
        factor = super()._result_factor(call)
        if "counts" not in call.memo:
            return factor
        index, unrecovered = call.memo["counts"]
        arrivals = call.appended_result if index is None else call.results[index]
        assert arrivals is not None
        rescale = arrival_factor(arrivals, call.world, unrecovered)
        return rescale if factor is None else factor.mul_(rescale)


class StaleFill(Fill):
    """``fill="stale"`` (post drop only): a lost packet of the result takes the last finite
    value received for it (0 before the first)."""

    name = "stale"
    keeps_stale = True

    @classmethod
    def refuses(cls, config: LossConfig) -> str | None:
        if config.drop_point != "post":
            return (
                "fill='stale' needs drop_point='post' (a worker's lost contribution has no "
                f"previous value at the receiver); got drop_point={config.drop_point!r}"
            )
        return None

    def post_keep(self, post_lost: Mask, post_factor: float | torch.Tensor) -> Mask:
        return None

    def fill_result_(self, layout: PacketLayout, out: torch.Tensor, post_lost: Mask, stale: Mask) -> None:
        assert stale is not None
        stale_fill_(layout, out, post_lost, stale)

    def fill_received_(
        self, layout: PacketLayout, out: torch.Tensor, lost: torch.Tensor | None, stale: torch.Tensor | None
    ) -> None:
        assert stale is not None
        stale_fill_(layout, out, lost, stale)

    def before_wire(self, call: BucketCall, x: torch.Tensor) -> torch.Tensor:
        # the stale buffer is in the bucket's dtype (no stale fill with an encoding)
        assert call.result is not None
        stale = call.memo["stale"] = call.state.buckets.stale_buffer(call.record, call.result)
        call.keep_alive(stale, call.post_lost)
        return super().before_wire(call, x)

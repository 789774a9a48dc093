r"""The per-packet rules of a lossy collective, written once for the DDP hook and the FSDP
collectives.

To these rules a DDP bucket and an FSDP shard set are the same thing: ``rows x n`` packets
of one :class:`~lossy_hooks.core.packetization.PacketLayout` (a DDP bucket is one row; an
FSDP reduce-scatter input or all-gather output is ``W`` rows, row ``j`` bound for or coming
from rank ``j``, a packet never crossing a row). Masks are bool tensors of that shape
(``True`` = lost), factors fp32 tensors of it.

- worker rescale (:func:`arrival_factor`): ``f_j = W / c_j`` from the arrival counts
  ``c_j = sum_r a_{r,j}``, and ``0`` where no copy arrived (``c_j = 0``, counted as
  unrecovered);
- arrival counts replayed from the peers' generators (:func:`regenerated_counts`):
  ``c_j = a_{r,j} + sum_{r' != r} a_{r',j}``, each peer's mask drawn through the same
  FEC, retransmission and protection as its own; for shard rows each peer's own row is
  never lost (:func:`insert_own_row`);
- post keep (:func:`post_keep`): ``0`` on a lost packet of the result, ``1/q`` (rescale: ``q``
  the loss model's expected kept fraction, :func:`post_rescale_factor`) or ``1`` (zero) on a
  received one, nothing for stale;
- stale fill (:func:`stale_fill_`): a lost packet takes the last finite value received for
  it (by selection: received packets are never touched), and the stale buffer takes every
  received finite packet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from lossy_hooks.core.packetization import PacketLayout

__all__ = [
    "arrival_factor",
    "insert_own_row",
    "post_keep",
    "post_rescale_factor",
    "regenerated_counts",
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


def post_keep(
    post_lost: torch.Tensor | None, fill: str, post_factor: float | torch.Tensor
) -> torch.Tensor | None:
    """The per-packet factor of a post drop on the result: ``0`` where lost, else
    ``post_factor`` (``fill="rescale"``, ``1/q``) or ``1`` (``"zero"``); ``None`` without a
    mask or for ``"stale"`` (filled by :func:`stale_fill_`, not scaled)."""
    if post_lost is None or fill == "stale":
        return None
    return torch.where(post_lost, 0.0, post_factor if fill == "rescale" else 1.0)


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

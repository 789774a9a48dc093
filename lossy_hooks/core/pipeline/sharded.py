r"""The packet pipeline of a reduce-scatter and an all-gather of ``W`` rows: FSDP2's two
collectives and the lossy process group's ``reduce_scatter_tensor`` /
``all_gather_into_tensor``. The math is in :mod:`lossy_hooks.fsdp` (the rows, who loses
what, the fills) and docs/semantics.md; here is its one implementation.

A collective of ``W`` rows (row ``j`` for or from rank ``j``) packetizes one row (a packet
never crosses a row); a rank's own row never crosses the network and is never lost, so
``(W - 1) n`` packets are counted per call. Both run on the stream they are called on, with
no host synchronisation, and return when the result is in ``output``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lossy_hooks.core.pipeline.chain import after_collective, before_collective
from lossy_hooks.core.techniques import BucketCall
from lossy_hooks.core.techniques.fills import insert_own_row

if TYPE_CHECKING:
    from lossy_hooks.core.buckets import BucketRecord
    from lossy_hooks.core.state import LossyState
    from lossy_hooks.core.streams import DropSite

__all__ = ["Counted", "RecordOf", "ShardedCollectives", "sharded_refusal"]

# (rows, post_rows) -> the record of this collective's (W, numel) rows, of which a post
# draw covers ``post_rows`` rows (BucketRecords.shard_record)
RecordOf = Callable[[torch.Tensor, int], "BucketRecord"]
# what a collective counted, per drop point: (packets, bytes, loss mask or None)
Counted = list[tuple[int, int, "torch.Tensor | None"]]


def sharded_refusal(state: LossyState, collective: str) -> str | None:
    """Why ``state`` cannot run a reduce-scatter or an all-gather of rows (``collective``:
    ``"reduce-scatter"`` or ``"all-gather"``), naming the setting; ``None`` if it can: the
    settings that need a bucket of parameters (``LossConfig.fsdp_refusal``), the placement's
    refusals (a tree has no sharded form) and appended counts (the output is the caller's
    buffer)."""
    refused = state.settings.fsdp_refusal(collective)
    if refused is not None:
        name, value, why = refused
        return f"{collective}: {name}={value!r} is not supported under FSDP ({why})"
    why = state.placement.fsdp_refuses(state.settings, collective)
    if why is not None:
        return f"{collective}: {why}"
    if state.counts_transport == "append":
        return (
            f"{collective}: counts_transport='append' is not supported (the reduce-scatter output "
            "is FSDP's own buffer); use 'separate', 'regenerate' or 'auto'"
        )
    return None


class ShardedCollectives:
    """The lossy reduce-scatter and all-gather of one state: ``groups`` reduce-scatters make
    a training step (FSDP: one per parameter group; ``0``: no steps counted)."""

    def __init__(self, state: LossyState, groups: int) -> None:
        self.state = state
        self.groups = groups
        self.calls = 0

    def draw_network(
        self, site: DropSite, record: BucketRecord, world: int, rank: int
    ) -> torch.Tensor | None:
        """``(W, n)`` loss mask of the rows crossing the network at ``site`` (own row kept),
        counted in the ledger as ``(W-1) n`` packets; ``None`` when nothing can be lost."""
        n = record.layout.num_packets
        shared = not site.per_rank
        drawn = self._draw_rows(site, record, world if shared else world - 1, rank)
        if drawn is None:
            lost = None
        elif shared:  # one mask for every receiver: a sender's packet lost for all of them
            lost = drawn.view(world, n).clone()
            lost[rank] = False
        else:
            lost = insert_own_row(drawn.view(world - 1, n), rank)
        net = None if lost is None else torch.cat((lost[:rank], lost[rank + 1 :]))
        self.state.ledger.count(site.name, record.key, (world - 1) * n, net)
        return lost

    def draw_hops(
        self, site: DropSite, record: BucketRecord, world: int, rank: int, counts: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A per-hop placement (ring, direct): the ``(W, n)`` loss mask of the shard rows at
        ``site`` (chunk ``c`` of the collective is row ``c``, owned by rank ``c``: the own
        row is never lost) and, with ``counts``, the ``(W, n)`` arrival counts; the rows
        that cross the network counted in the ledger as ``(W-1) n`` packets, and every link."""
        state, n = self.state, record.layout.num_packets
        if world != state.world_size:
            raise ValueError(
                f"algorithm={state.algorithm!r}: one LossyState serves one group; this collective runs "
                f"on {world} ranks, the state's hops on {state.world_size}"
            )
        masks = state.hop_masks(world * n, world * record.wire_bytes, counts, False)
        lost = masks.lost if site.name == "worker" else masks.post_lost
        rows = None if lost is None else lost.view(world, n)
        net = None if rows is None else torch.cat((rows[:rank], rows[rank + 1 :]))
        state.ledger.count(site.name, record.key, (world - 1) * n, net)
        arrivals = None if masks.arrivals is None else masks.arrivals.view(world, n)
        return rows, arrivals

    def _draw_rows(self, site: DropSite, record: BucketRecord, rows: int, rank: int) -> torch.Tensor | None:
        """The loss mask of ``rows`` rows of the record's packets at ``site`` (flat), after
        retransmission when the state has it (``Protection.resolve``: each lost packet sent
        again, up to ``retransmit`` times), its counters added to the ledger. A rank's own
        draw is resolved at once and counted whole; a shared mask (every rank draws every
        row alike) row by row, this rank counting only its own row ``rank``."""
        state = self.state
        n = record.layout.num_packets
        if site.lossless or not state.protecting:
            return site.draw(rows * n)
        assert state.device is not None
        if site.per_rank:
            lost, counters = state.protection.resolve(rows * n, site.draw, None, state.device)
            state.ledger.count_protection(site.name, record.key, counters)
            return lost
        masks = []
        for row in range(rows):  # a loop over ranks, each one vectorized over packets
            lost, counters = state.protection.resolve(n, site.draw, None, state.device)
            if row == rank:
                state.ledger.count_protection(site.name, record.key, counters)
            masks.append(lost)
        return torch.cat(masks)

    def step_done(self) -> None:
        """One more reduce-scatter: a training step every ``groups`` of them (all-gathers,
        whose number per step depends on resharding, count no steps)."""
        self.calls += 1
        if self.groups and self.calls % self.groups == 0:
            self.state.steps += 1

    def _worker_masks(self, call: BucketCall, world: int, rank: int) -> None:
        """``call.lost``: the ``(W, n)`` loss mask of this rank's rows (own row kept) and, on
        a per-hop placement, ``call.arrivals`` (the ``(W, n)`` counts every rank replays)."""
        state = self.state
        if not state.drops_before:
            return
        if state.hops is not None:  # per hop of a ring / direct exchange
            needs = state.fill_technique.needs_counts
            call.lost, call.arrivals = self.draw_hops(state.worker, call.record, world, rank, needs)
        else:
            call.lost = self.draw_network(state.worker, call.record, world, rank)

    def reduce_scatter(
        self, output: torch.Tensor, input: torch.Tensor, group: Any, op: Any, record_of: RecordOf
    ) -> Counted:
        """``output`` <- row ``rank`` of the lossy reduce over the ranks' ``input`` rows: the
        masks of this call, then the technique chain around the collective
        (:mod:`~lossy_hooks.core.pipeline.chain`; the collective's ``op``, FSDP's average,
        is the mean: ``scale = 1``). Returns what it counted: ``(packets, bytes, lost mask)``
        per drop point."""
        state = self.state
        state.prepare(input, group)
        state.bucket_calls += 1
        if state.reduction == "sum":
            if op != dist.ReduceOp.AVG:
                raise ValueError(
                    f"reduction='sum' replaces FSDP's average, but FSDP asked for {op} (a gradient "
                    "divide factor or a low-precision reduce dtype): use reduction='mean'"
                )
            op = dist.ReduceOp.SUM
        if state.passing_through:
            dist.reduce_scatter_single(output=output, input=input, op=op, group=group)
            return []
        world, rank = state.world_size, state.rank
        assert world is not None and rank is not None
        if group.size() != world:
            raise ValueError(
                f"one LossyState serves one process group: this reduce-scatter runs on {group.size()} "
                f"ranks, the state's first on {world}"
            )
        rows = input.view(world, -1)
        record = record_of(rows, world if not state.post.per_rank else 1)
        call = BucketCall(state, record, rows, world, 1.0, state.steps, output, world, rank)
        self._worker_masks(call, world, rank)
        if state.drops_after:
            call.post_lost = self._draw_post(record, world, rank)
            call.post_factor = record.post_factor
        main = before_collective(call)

        def scatter(tensor: torch.Tensor, reduce_op: Any) -> torch.Tensor:
            # flat as the input (Gloo checks the first dimensions: a sequence-parallel shard is 3-D)
            into = output.view(-1) if tensor is rows else tensor.new_empty(tensor.numel() // world)
            if reduce_op is None:  # the payload: through the placement's collective
                state.placement.reduce_scatter(into, tensor.reshape(-1), op, group)
            else:
                dist.reduce_scatter_single(output=into, input=tensor.reshape(-1), op=reduce_op, group=group)
            return into

        results = [scatter(main, None)]
        results += [scatter(t, op if like else dist.ReduceOp.SUM) for t, like in call.extra]
        out = after_collective(call, results)
        if out.data_ptr() != output.data_ptr():
            output.copy_(out.view_as(output))
        self.step_done()
        n, lost = record.layout.num_packets, call.lost
        counted: Counted = []
        if state.drops_before:
            counted.append(((world - 1) * n, (world - 1) * record.wire_bytes, lost))
        if state.drops_after:
            counted.append((n, record.wire_bytes, call.post_lost))
        return counted

    def _draw_post(self, record: BucketRecord, world: int, rank: int) -> torch.Tensor | None:
        """This rank's post mask of its shard: its row of one whole-result mask (shared), or
        its own draw (independent)."""
        state, n = self.state, record.layout.num_packets
        site = state.post
        drawn = self._draw_rows(site, record, world if not site.per_rank else 1, rank)
        lost = None if drawn is None else (drawn.view(world, n)[rank] if not site.per_rank else drawn)
        state.ledger.count(site.name, record.key, n, lost)
        return lost

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, group: Any, record_of: RecordOf) -> None:
        """Row ``j`` of ``output`` <- rank ``j``'s ``input``, each packet of another rank's
        row lost at this receiver at the state's post site (zero or stale; the stale copy
        starts as the first gather's values)."""
        state = self.state
        state.prepare(output, group)
        state.bucket_calls += 1
        if state.passing_through:
            dist.all_gather_single(output, input, group=group)
            return
        state.placement.all_gather(output, input, group)
        # this call's group (a backward all-gather may run on a smaller group than the
        # forward one, fully_shard(reshard_after_forward=<int>))
        world, rank = group.size(), group.rank()
        rows = output.view(world, -1)
        record = record_of(rows, 1)
        fill = state.fill_technique
        if fill.keeps_stale and record.stale is None:
            record.stale = rows.clone()  # every rank built the whole model before sharding it
        if state.hops is not None:  # per hop: rank c's shard travels the algorithm's broadcast phase
            lost, _ = self.draw_hops(state.post, record, world, rank, False)
        else:
            lost = self.draw_network(state.post, record, world, rank)
        fill.fill_received_(record.layout, rows, lost, record.stale)
        self.step_done()

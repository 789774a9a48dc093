"""The hook's hot path must not synchronise with the device: no .item(), .tolist(), .cpu(),
float()/int() of a tensor, nonzero() or print in the functions that run per bucket (a static
read of their source; tests/multiprocess/test_hook_ddp.py::test_no_host_sync_on_any_path checks the same
at run time, on every configuration path, with the calls patched to raise)."""

from __future__ import annotations

import inspect
import re

import pytest

from lossy_hooks import fsdp, hook, loss_models
from lossy_hooks.core import (
    buckets,
    ledger,
    netclock,
    network,
    packetization,
    placement,
    state,
    streams,
    techniques,
)
from lossy_hooks.core.pipeline import allreduce as allreduce_pipeline
from lossy_hooks.core.pipeline import chain, sharded
from lossy_hooks.core.techniques import fec, fills, hadamard, protect, protection, retransmit
from lossy_hooks.loss_models import deadline, markov

# every technique's per-bucket methods (what a chain runs, and the fill rules FSDP calls)
TECHNIQUE_METHODS = [
    getattr(cls, name)
    # sorted: pytest-xdist's workers must collect the same tests in the same order
    for cls in sorted(
        {*techniques.CHAIN, *techniques.TECHNIQUES, *techniques.FILLS.values()}, key=lambda c: c.__qualname__
    )
    for name in (
        "before_wire",
        "after_collective",
        "worker_keep",
        "post_keep",
        "fill_result_",
        "fill_received_",
        "_worker_factor",
        "_result_factor",
    )
    if name in vars(cls)
]

HOT_PATH = [
    hook.lossy_allreduce_hook,
    allreduce_pipeline.all_reduce,
    allreduce_pipeline.join,
    chain.before_collective,
    chain.after_collective,
    allreduce_pipeline._sum,
    streams.DropSite.draw,
    ledger.PacketLedger.count,
    ledger.PacketLedger.unrecovered_counter,
    ledger.PacketLedger.fidelity_slot,
    state.LossyState.draw,
    state.LossyState.draw_masks,
    placement.HopLoss.masks,
    placement.HopLoss.draw,
    placement.HopLoss.survival,
    placement.path_products,
    ledger.PacketLedger.count_links,
    buckets.BucketRecords.lookup,
    buckets.BucketRecords.stale_buffer,
    *TECHNIQUE_METHODS,
    techniques.BucketCall.reduce_also,
    techniques.BucketCall.append_to_bucket,
    techniques.BucketCall.keep_alive,
    techniques.error_feedback.feed_back_,
    hadamard.encode,
    hadamard.decode_,
    hadamard.fwht,
    hadamard._factor,
    hadamard.fwht_,
    hadamard._transform,
    hadamard._sign_words,
    hadamard._flip_signs_,
    hadamard._sign_bits,
    protection.Protection.resolve,
    fec.ForwardErrorCorrection.recover,
    fec.ForwardErrorCorrection._data_of,
    fec.ForwardErrorCorrection._after_fec,
    retransmit.Retransmission.recover,
    protect.ProtectedPackets.recover,
    ledger.PacketLedger.count_protection,
    fills.scale_before_collective,
    state.LossyState.peer_draws,
    fills.regenerated_counts,
    fills.stale_fill_,
    fills.post_rescale_factor,
    buckets.BucketRecords.shard_record,
    techniques.fidelity.fidelity_sums,
    fills.arrival_factor,
    fills._exact_factor,
    fsdp.LossyReduceScatter.__call__,
    fsdp.LossyAllGather.__call__,
    sharded.ShardedCollectives.reduce_scatter,
    sharded.ShardedCollectives._worker_masks,
    sharded.ShardedCollectives._draw_post,
    sharded.ShardedCollectives.all_gather,
    sharded.ShardedCollectives.draw_network,
    sharded.ShardedCollectives.step_done,
    fills.insert_own_row,
    netclock.SimClock.tick,
    netclock.SimClock._tick_ring,
    netclock.SimClock._tick_hops,
    netclock.SimClock._stragglers,
    netclock.SimClock._resends,
    netclock.SimClock.deadline_multiple,
    netclock.SimClock.hop_late,
    deadline.AdaptiveDeadline.multiple,
    state.LossyState.hop_masks,
    sharded.ShardedCollectives.draw_hops,
    netclock.SimClock.lost_row,
    network.NetworkModel.sample_delays,
    loss_models.DeadlineLoss.sample,
    markov._TransitionMaps.state_indices,
    markov._TransitionMaps._scan,
    markov._TransitionMaps.tables,
    markov._scan_states_by_gather,
    *[
        getattr(packetization.PacketLayout, n)
        for n in (
            "_split",
            "_per_packet_mul_",
            "zero_",
            "scale_",
            "fill_from_",
            "finite_packets",
            "expand",
            "packet_sizes",
        )
    ],
    *[
        cls.sample
        for cls in (
            loss_models.Bernoulli,
            loss_models.ExactCount,
            loss_models.TailDrop,
            loss_models.Trace,
            loss_models.MarkovLossModel,
        )
    ],
]
SYNCING = re.compile(r"\.item\(|\.tolist\(|\.cpu\(|\.numpy\(|nonzero\(|(?<![.\w])(?:float|int|bool|print)\(")


@pytest.mark.parametrize("fn", HOT_PATH, ids=lambda f: f.__qualname__)
def test_hot_path_has_no_host_sync(fn):
    source = inspect.getsource(fn)
    code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
    code = re.sub(r'"""[\s\S]*?"""', "", code)
    assert not SYNCING.findall(code), f"{fn.__qualname__} synchronises: {SYNCING.findall(code)}"

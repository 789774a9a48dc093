"""The lossy process group (Gloo, W = 3, one launch): group_worker.py runs DDP, FSDP2,
DTensor tensor parallelism, pipelining and all-to-all over it at loss 0 (bitwise the plain
group), every kind of collective at 20% loss on values that say who sent them (decoded here
into loss masks and checked against the closed forms), control traffic at 50%, the stale
fill, a resume and the refusal of a second loss on the same traffic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from lossy_hooks import LossyState, lossy_group
from lossy_hooks.core.network import NetworkModel
from lossy_hooks.core.statistics import binomial_interval
from lossy_hooks.group import KINDS, check_backend, check_group_state

from ..launch import launch

WORKER = Path(__file__).with_name("group_worker.py")
SCENARIOS = ["lossless", "rates", "control", "stale", "resume", "nodes_and_streams", "refusals"]
SCENARIOS += ["subgroups", "pipeline", "moe_reference", "moe_lossy"]  # moe_*: moe_worker.py
WORLD = 3
P = 0.2
CALLS = 60


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch(WORKER, WORLD, SCENARIOS, tmp_path_factory.mktemp("group") / "results.json")


def inside(count: int, n: int, p: float) -> bool:
    lo, hi = binomial_interval(n, p, 0.999)
    return lo <= count <= hi


def test_loss_zero_is_bitwise_the_plain_group_under_every_parallelism(ranks):
    for r in ranks:
        assert {k: r["lossless"][k] for k in ("ddp", "fsdp", "tp", "pp", "a2a")} == dict.fromkeys(
            ("ddp", "fsdp", "tp", "pp", "a2a"), True
        )
        assert all(c["packets_lost"] == 0 for c in r["lossless"]["collectives"].values())
    # every kind went through the group (the broadcasts reach the ranks that are not the root)
    seen = set().union(*(r["lossless"]["collectives"] for r in ranks))
    assert seen == set(KINDS)


def test_delivered_kinds_lose_each_packet_from_another_rank_at_p_and_zero_it(ranks):
    """all-gather, all-to-all (uneven), broadcast, messages: what arrived is exact, what was
    lost is zero (the worker asserts both), an own chunk never lost; the decoded losses are
    binomial(p) and are exactly what the state counted."""
    total = {r_kind: 0 for r_kind in ("all_gather", "all_to_all", "broadcast", "p2p")}
    for kind in total:
        packets = sum(r["rates"][kind]["packets"] for r in ranks)
        lost = packets - sum(r["rates"][kind]["arrived"] for r in ranks)
        counted = ranks[0]["rates"]["collectives_all"][kind]
        assert (counted["packets_sent"], counted["packets_lost"]) == (packets, lost), kind
        assert inside(lost, packets, P), (kind, lost, packets)
        total[kind] = packets
    # packets per call: all-gather 2 rows of 3 packets; broadcast 4 packets at 2 receivers
    assert total["all_gather"] == WORLD * CALLS * 2 * 3
    assert total["broadcast"] == CALLS * 2 * 4
    assert total["p2p"] == WORLD * CALLS * 3


def contributions(ranks, name: str) -> np.ndarray:
    """``a[rank, call, packet, q]``: rank q's contribution arrived (rank q sends 2^q)."""
    v = np.array([r["rates"][name] for r in ranks]).astype(int)
    return (v[..., None] >> np.arange(WORLD)) & 1


def test_all_reduce_is_the_hooks_worker_drop_with_zero_fill(ranks):
    a = contributions(ranks, "all_reduce")
    assert (a == a[0]).all()  # one sum, the same on every rank
    lost = 1 - a[0]  # (call, packet, q)
    counted = ranks[0]["rates"]["collectives_all"]["all_reduce"]
    assert counted["packets_sent"] == lost.size  # every rank's 10 packets per call
    assert counted["packets_lost"] == lost.sum()
    assert inside(int(lost.sum()), lost.size, P)
    both = lost[..., 0] * lost[..., 1]  # independent ranks: a packet lost by both at p^2
    assert inside(int(both.sum()), both.size, P * P)


def test_reduce_scatter_is_fsdps_with_the_own_row_never_lost(ranks):
    a = contributions(ranks, "reduce_scatter")  # (owner, call, packet, q)
    for owner in range(WORLD):
        assert a[owner, ..., owner].all()
    remote = np.concatenate([np.delete(a[j], j, axis=-1).reshape(-1) for j in range(WORLD)])
    counted = ranks[0]["rates"]["collectives_all"]["reduce_scatter"]
    assert (counted["packets_sent"], counted["packets_lost"]) == (remote.size, int((1 - remote).sum()))
    assert inside(int((1 - remote).sum()), remote.size, P)


def test_control_traffic_is_never_lost(ranks):
    for r in ranks:
        c = r["control"]
        assert c["objects"] and c["ints"] and c["max"] and c["marked"] and c["functional"]
        assert c["lossy_differs"]  # the same group does lose a plain float all-reduce
        assert c["kinds"] == ["all_reduce"]  # and counts only that one


def test_stale_fill_keeps_the_last_message_from_that_peer(ranks):
    for r in ranks:
        assert r["stale"]["ok"]
        assert r["stale"]["lost"] == r["stale"]["counted"] > 0


def test_resume_continues_the_loss_sequence_and_a_second_loss_is_refused(ranks):
    for r in ranks:
        assert r["resume"] == {"same": True, "lost_any": True}
        assert r["refusals"] == {"refused": True, "wrapped_twice_refused": True}


def test_nodes_avg_and_one_stream_per_kind(ranks):
    """ranks_per_node = 2 at W = 3, loss 50%: what ranks 0 and 1 send each other (and
    themselves) always arrives, what crosses to or from rank 2 does not; AVG is the mean;
    all-reduces between all-to-alls leave the all-to-all's losses as they were."""
    for rank, r in enumerate(ranks):
        node = rank // 2
        assert r["nodes_and_streams"]["intact"] == [j // 2 == node for j in range(WORLD)]
        assert r["nodes_and_streams"]["avg"]
        assert r["nodes_and_streams"]["streams_apart"]


@pytest.mark.parametrize(
    "settings, kinds, message",
    [
        ({"fill": "zero"}, ("all_reduce", "gossip"), "kinds must be among"),
        ({}, None, "fill='rescale' has no meaning for all_gather, all_to_all, broadcast, p2p"),
        ({}, ("p2p",), "fill='rescale' has no meaning for p2p"),
        (
            {"fill": "zero", "loss_model": "deadline 1.5x", "network": NetworkModel()},
            ("all_to_all",),
            "deadline",
        ),
        ({"fill": "zero", "reduction": "sum"}, ("all_reduce",), "reduction='sum'"),
        ({"packetization": "tensor"}, ("reduce_scatter",), "packetization='tensor' is not supported"),
        ({"fill": "zero", "algorithm": "ring", "link_loss": "0->1=5%"}, ("p2p",), "link_loss applies"),
    ],
)
def test_bad_settings_are_refused_before_any_collective(settings, kinds, message):
    state = LossyState(**({"loss_rate": 0.1} if "loss_model" not in settings else {}), **settings)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_group_state(state, kinds)


def test_rescale_is_accepted_where_it_has_a_meaning():
    assert check_group_state(LossyState(loss_rate=0.1), ("all_reduce", "reduce_scatter")) == {
        "all_reduce",
        "reduce_scatter",
    }


def test_only_gloo_and_nccl_groups_are_wrapped():
    assert check_backend("Gloo") == "gloo" and check_backend("nccl") == "nccl"
    with pytest.raises(ValueError, match="backend is 'mpi'"):
        check_backend("mpi")


def test_a_group_needs_an_initialized_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group first"):
        lossy_group(LossyState(loss_rate=0.1, fill="zero"))


def test_subgroups_carry_a_tensor_parallel_gpt(ranks):
    """lossy_subgroups([[0, 1], [2]]): gpt-tiny tensor-parallel over ranks 0, 1 (2 heads each:
    qkv reordered per rank) computes the unsharded model's loss and embedding gradient to
    round-off at loss 0; per rank 8 all-reduces a step (2 blocks x attention and MLP, forward
    and backward) of 22 packets (2 x 64 x 64 fp32 at 1500 B); at 20% the loss rate is in its
    99.9% interval and the loss moves. Overlapping lists are refused."""
    for r in ranks[:2]:
        zero, lossy = r["subgroups"]["0.0"], r["subgroups"][str(P)]
        assert zero["losses"][0] == pytest.approx(zero["losses"][1], rel=1e-5) and zero["grad_err"] < 1e-4
        assert zero["calls"] == 8 and zero["packets_sent"] == 8 * 22 and zero["packets_lost"] == 0
        assert lossy["packets_sent"] == 8 * 22 and lossy["losses"][0] != lossy["losses"][1]
    sent = sum(r["subgroups"][str(P)]["packets_sent"] for r in ranks[:2])
    lost = sum(r["subgroups"][str(P)]["packets_lost"] for r in ranks[:2])
    lo, hi = binomial_interval(sent, P, 0.999)
    assert lo <= lost <= hi
    assert all(r["subgroups"]["overlap_refused"] for r in ranks)


def test_sequence_parallel_gpt_over_the_lossy_subgroup(ranks):
    """gpt-tiny with --sequence_parallel (whole, a 1-block GPT whose block splits and gathers
    the stream, and the first of 2 pipeline stages, which sends its rank's 32 of 64
    positions), and moe-tiny (its MoE layer on the gathered sequence: an all-gather in, a
    slice out, whose adjoints are a slice and an all-gather): the loss and the embedding's
    and first norm's gradients (the norm's partial sums reduced: read whole here) are the
    unsharded model's to round-off, and a step is Megatron's pattern: per block 4
    all-gathers and 4 reduce-scatters (attention and MLP, forward and backward; an MoE
    block 4 and 2) of a rank's half of the sequence, 2 x 32 x 64 fp32 = 11 packets of
    1500 B (half an all-reduce's 22: the same bytes), plus one all-gather at each end of the
    stream (the first block's input gradient; the last block's output, not for a stage that
    sends on)."""
    # case: (blocks, all-gathers and reduce-scatters per block, stream ends gathered, output shape)
    cases = {
        "whole": (2, 4, 4, 2, [2, 64, 256]),
        "one_block": (1, 4, 4, 2, [2, 64, 256]),
        "stage0": (1, 4, 4, 1, [2, 32, 64]),
        "moe": (2, 4, 2, 2, [2, 64, 256]),  # the MoE layer's gather and its adjoint: no scatter
    }
    for r in ranks[:2]:
        for case, (blocks, block_gathers, block_scatters, ends, shape) in cases.items():
            sp = r["subgroups"]["sequence_parallel"][case]
            assert sp["shape"] == shape, case
            assert sp["losses"][0] == pytest.approx(sp["losses"][1], rel=1e-5), case
            assert sp["tok"] < 1e-5 and sp["ln1"] < 1e-5, case
            counts = sp["counts"]
            gathers, scatters = block_gathers * blocks + ends, block_scatters * blocks
            for kind, calls in (("all_gather", gathers), ("reduce_scatter", scatters)):
                assert counts[kind] == {"calls": calls, "packets_sent": 11 * calls, "packets_lost": 0}, case
            assert counts["all_reduce"]["calls"] == 1  # the test's own: the norm's gradient read whole


def test_a_pipelined_gpt_over_the_lossy_group(ranks):
    """gpt-small in 3 stages (GPTStage) under GPipe over the lossy group's p2p: at loss 0 the
    micro-batch losses and every stage's gradients are the whole model's (to 1e-5); the
    activations (forward) and their gradients (backward) cross the stage boundaries as p2p
    messages, the same packets at 20% as at 0, of which the lost fraction is in its 99.9%
    interval; the losses move."""
    last = ranks[-1]
    zero, lossy = last["pipeline"]["0.0"], last["pipeline"][str(P)]
    assert zero["losses"] == pytest.approx(zero["expected"], rel=1e-6)
    assert lossy["losses"] != pytest.approx(lossy["expected"], rel=1e-6)
    for r in ranks:
        assert r["pipeline"]["0.0"]["grad_err"] < 1e-5
        assert r["pipeline"]["0.0"]["packets_lost"] == 0
    sent = sum(r["pipeline"][str(P)]["packets_sent"] for r in ranks)
    lost = sum(r["pipeline"][str(P)]["packets_lost"] for r in ranks)
    assert sent == sum(r["pipeline"]["0.0"]["packets_sent"] for r in ranks) > 0
    lo, hi = binomial_interval(sent, P, 0.999)
    assert lo <= lost <= hi


# The expert-parallel MoE layer (tests/multiprocess/moe_worker.py, E = 6 over the 3 ranks)


def test_expert_parallel_layer_is_the_all_local_layer_to_round_off(ranks):
    for r in ranks:
        ref = r["moe_reference"]
        assert ref["same_init"]  # one seed: every rank's experts are the all-local layer's slice
        assert (ref["output"], ref["input_grad"], ref["router_grad"]) == (True, True, True)
        assert ref["expert_grads"] == [True] * 4  # w_fc, b_fc, w_proj, b_proj of the owned experts
        assert ref["max_error"] < 1e-12  # float64
        assert ref["dropped"] > 0  # the capacity dropped slots, the same ones as the reference's
    splits = [r["moe_reference"]["splits"] for r in ranks]
    assert any(len(set(s)) > 1 for s in splits)  # uneven: the splits the all-to-all really took
    assert splits[0][1] != splits[1][0]  # and the two directions carry different numbers of tokens


def test_lossy_group_sees_dispatch_and_combine_forward_and_backward(ranks):
    for r in ranks:
        lossy = r["moe_lossy"]
        assert lossy["bitwise"]  # loss 0: outputs and every gradient bitwise the plain group's
        # one MoE layer, one step: dispatch + combine forward, their two backward all-to-alls;
        # the int64 count exchange is control traffic, not counted
        assert lossy["calls"] == 4
        sent, lost = lossy["lossless_counts"]
        assert sent > 0 and lost == 0
        calls, sent, lost = lossy["lossy_counts"]
        assert calls == 4 and 0 < lost < sent
        assert lossy["lossy_output_differs"] and lossy["lossy_grads_differ"]

"""The per-hop placements (ring, tree, dbtree, direct) in real Gloo process groups: the fast
path (masks around the real allreduce) delivers exactly the contributions of literal
point-to-point algorithms fed the same hop losses, at W = 2..5 for every phase and fill;
survival and receipt by distance / depth in 99.9% binomial intervals; the delivered fraction
against its closed form; loss 0 bitwise DDP; per-link counts; resume; the deadline transport
per hop (fixed, adaptive) through the literal algorithms with one clock on every rank; FSDP2's
reduce-scatter and all-gather per hop of a ring and a direct exchange. One launch per W."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lossy_hooks.core.statistics import binomial_interval
from tests.launch import launch
from tests.nccl_trees import nccl_tree_parents

WORKER = Path(__file__).with_name("placement_worker.py")
SCENARIOS = {
    2: ["oracle"],
    3: ["oracle", "clocked", "fsdp_oracle", "loss0_bitwise", "distances", "resume"],
    4: ["oracle", "clocked", "fsdp_oracle", "distances", "heterogeneous"],
    5: ["oracle", "distances"],
}
P_DIST = 0.2  # distances()'s per-link loss rate
Z999 = 3.2905  # two-sided 99.9% normal quantile


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def run(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world = request.param
    out = tmp_path_factory.mktemp(f"placements{world}") / "out.json"
    return world, launch(WORKER, world, SCENARIOS[world], out)


def _depths(parent: np.ndarray) -> list[int]:
    out = []
    for r in range(len(parent)):
        d, x = 0, r
        while parent[x] != x:
            x, d = int(parent[x]), d + 1
        out.append(d)
    return out


def hops_to_root(algorithm: str, world: int, chunk: int, rank: int, phase: str) -> int:
    """The closed form's exponent: hops between ``rank`` and chunk ``chunk``'s root."""
    if algorithm == "ring":  # reduce: d hops upstream of the owner; broadcast: k downstream
        return (chunk - rank) % world if phase == "reduce" else (rank - chunk) % world
    if algorithm == "direct":
        return 0 if rank == chunk else 1
    return _depths(np.array(nccl_tree_parents(world)[chunk]))[rank]


def test_the_fast_path_delivers_what_the_literal_algorithms_deliver(run):
    world, results = run
    assert len(results) == world
    lost = 0
    for rank, result in enumerate(results):
        for case, v in result["oracle"].items():
            assert v["equal"], (world, rank, case)
            assert v["rel"] < 1e-6, (world, rank, case, v["rel"])
            lost += v["lost"]
    assert lost > 100  # the comparison saw losses (P = 0.3 over every case)


def test_the_deadline_transport_per_hop_loses_what_the_one_clock_finds_late(run):
    world, results = run
    if "clocked" not in SCENARIOS[world]:
        pytest.skip("at W = 3, 4")
    lost = 0
    for rank, result in enumerate(results):
        for case, v in result["clocked"].items():
            assert v["equal"] and v["rel"] < 1e-6, (world, rank, case, v["rel"])
            assert v["clock"] == results[0]["clocked"][case]["clock"], (rank, case)  # one clock
            lost += v["lost"]
            clock = v["clock"]
            assert clock["sim_comm_s"] == pytest.approx(
                clock["sim_comm_reduce_s"] + clock["sim_comm_broadcast_s"]
            )
            assert clock["sim_comm_s"] < clock["sim_reliable_s"], case  # drops: the deadline wins
    assert lost > 100


def test_fsdp_reduce_scatter_and_all_gather_per_hop_equal_the_literal_ring_and_direct(run):
    world, results = run
    if "fsdp_oracle" not in SCENARIOS[world]:
        pytest.skip("at W = 3, 4")
    lost = 0
    for rank, result in enumerate(results):
        for case, v in result["fsdp_oracle"].items():
            assert v["equal"] and v["rel"] < 1e-6, (world, rank, case, v["rel"])
            assert v["calls"] == 4 and v["sent"] == 4 * (world - 1) * 3, case  # the rows that cross
            links = world if case.startswith("ring") else world * (world - 1)
            assert v["links"] == links, case
            lost += v["lost"]
    assert lost > 50


def test_survival_and_receipt_by_distance_against_the_closed_forms(run):
    world, results = run
    if "distances" not in SCENARIOS[world]:
        pytest.skip("distances run at W = 3, 4, 5")
    p = P_DIST
    checked = 0
    for algorithm in ("ring", "tree", "dbtree", "direct"):
        chunks = {"ring": world, "direct": world, "tree": 1, "dbtree": 2}[algorithm]
        reduce = results[0]["distances"][f"{algorithm}/reduce"]
        for c in range(chunks):
            for x in range(world):
                arrived, total = reduce["table"][c * world + x]
                q = (1 - p) ** hops_to_root(algorithm, world, c, x, "reduce")
                lo, hi = binomial_interval(total, q)
                assert lo <= arrived <= hi, (algorithm, "reduce", c, x, arrived / total, q)
            for rank in range(world):  # every rank received the result of chunk c with (1-p)^k
                got, total = results[rank]["distances"][f"{algorithm}/broadcast/{rank}"][c]
                q = (1 - p) ** hops_to_root(algorithm, world, c, rank, "broadcast")
                lo, hi = binomial_interval(total, q)
                assert lo <= got <= hi, (algorithm, "broadcast", c, rank, got / total, q)
                checked += 1
        # the mean delivered fraction of contributions (CLT over independent packets)
        expected = {
            "ring": (1 - (1 - p) ** world) / (world * p),
            "direct": 1 - p * (world - 1) / world,
        }.get(algorithm)
        if expected is None:  # trees: the mean over the ranks of (1-p)^depth, per half
            halves = [np.array(t) for t in nccl_tree_parents(world)][:chunks]
            expected = float(np.mean([np.mean([(1 - p) ** d for d in _depths(t)]) for t in halves]))
        half_width = Z999 * math.sqrt(reduce["var"] / reduce["samples"]) / world + 1e-12
        assert abs(reduce["mean"] / world - expected) <= half_width, (
            algorithm,
            reduce["mean"] / world,
            expected,
        )
        stats = results[0]["distances"][f"{algorithm}/worker/stats"]
        assert stats["worker"]["delivered_fraction"] == pytest.approx(
            1 - stats["worker"]["packets_lost"] / stats["worker"]["packets_sent"]
        )
        for row in stats["links"]:  # every link loses at the per-link rate
            lo, hi = binomial_interval(row["packets_carried"], p)
            assert row["phase"] == "reduce" and lo <= row["packets_lost"] <= hi, (algorithm, row)
        links = {"ring": world, "direct": world * (world - 1), "tree": world - 1}.get(algorithm)
        if links is not None:
            assert len(stats["links"]) == links
    assert checked == sum({"ring": world, "direct": world, "tree": 1, "dbtree": 2}.values()) * world


def test_loss_zero_is_bitwise_ddp_for_every_algorithm(run):
    world, results = run
    if "loss0_bitwise" not in SCENARIOS[world]:
        pytest.skip("at W = 3")
    for result in results:
        assert result["loss0_bitwise"] == {"ring": True, "tree": True, "dbtree": True, "direct": True}


def test_ranks_per_node_and_one_bad_link_are_counted_per_link(run):
    world, results = run
    if "heterogeneous" not in SCENARIOS[world]:
        pytest.skip("at W = 4")
    for result in results:  # every rank counts every link, the same
        assert result["heterogeneous"]["links"] == results[0]["heterogeneous"]["links"]
    rows = results[0]["heterogeneous"]["links"]
    assert {(r["phase"], r["link"]) for r in rows} == {
        (ph, f"{a}->{(a + 1) % world}") for ph in ("reduce", "broadcast") for a in range(world)
    }
    for row in rows:
        a, b = (int(x) for x in row["link"].split("->"))
        rate = 0.0 if a // 2 == b // 2 else 0.5 if (a, b) == (world - 1, 0) else 0.1
        lo, hi = binomial_interval(row["packets_carried"], rate)
        assert row["packets_carried"] > 0 and lo <= row["packets_lost"] <= hi, row


def test_a_resumed_state_continues_the_same_hop_losses(run):
    world, results = run
    if "resume" not in SCENARIOS[world]:
        pytest.skip("at W = 3")
    for result in results:
        assert result["resume"] == {"same": True, "lost_anything": True}

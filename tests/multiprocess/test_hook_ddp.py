"""The hook inside real multi-process DDP (Gloo, CPU), W = 2, 3 and 4: one process-group
launch per world size runs every scenario of hook_worker.py; the tests assert on them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lossy_hooks import MarkovFourState
from lossy_hooks.core.statistics import binomial_interval, markov_loss_interval

from ..launch import launch

WORKER = Path(__file__).with_name("hook_worker.py")
SCENARIOS = [
    "packets_mtu",
    "packets_tensor",
    "post_shared",
    "post_independent",
    "rescale_unbiased",
    "bitwise_loss0",
    "accumulation_and_views",
    "pickle_resume",
    "fidelity",
    "layer_accounting",
    "stale_rules",
    "fixed_count_rescale",
    "per_rank_streams",
    "rebuilt_buckets",
    "resync_momentum",
    "append_exactness",
    "no_host_sync",
    "rule_values",
    "half_buckets",
    "combinations",
]


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"W{w}")
def runs(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"w{world}") / "results.json"
    return world, launch(WORKER, world, SCENARIOS, out)


def test_packet_boundaries_every_k_elements(runs):
    world, ranks = runs
    r = ranks[0]["packets_mtu"]
    assert r["hook_packets"] == [21]  # the hook's count: ceil(2050 / 100)
    assert r["hook_sent_per_step"] == 21
    # where the delivered values ever change: exactly every 100 elements, the last packet
    # [2000, 2050) short; and never inside a packet
    assert r["boundaries"] == list(range(100, 2001, 100))
    assert r["non_uniform_packets"] == 0  # every packet arrives or is lost as a whole
    for rank in range(world):
        assert ranks[rank]["packets_mtu"]["steps"] == 150


def test_worker_drop_fraction_and_independence(runs):
    world, ranks = runs
    r = ranks[0]["packets_mtu"]
    n, p = r["total"], r["p"]
    lo, hi = binomial_interval(n, p, 0.999)
    for rank in range(world):
        lost = r["lost_per_rank"][rank]
        assert lo <= lost <= hi, (rank, lost, lo, hi)
        # what every rank saw arrive matches what that rank says it dropped
        assert ranks[rank]["packets_mtu"]["own_stats_lost"] == lost
        assert ranks[rank]["packets_mtu"]["own_stats_sent"] == n
    masks_differ = len(set(r["lost_per_rank"])) > 1
    assert masks_differ
    # independence: all ranks lose the same packet with probability p**W
    lo, hi = binomial_interval(n, p**world, 0.999)
    assert lo <= r["both_lost"] <= hi


def test_tensor_packetization_one_packet_per_parameter(runs):
    _, ranks = runs
    r = ranks[0]["packets_tensor"]
    assert r["non_uniform"] == 0
    assert r["stats_sent"] == r["packets"] == 800
    lo, hi = binomial_interval(r["packets"], r["p"], 0.999)
    assert all(lo <= x <= hi for x in r["lost_per_rank"])


def test_post_drop_shared_vs_independent(runs):
    world, ranks = runs
    shared = [ranks[i]["post_shared"] for i in range(world)]
    indep = [ranks[i]["post_independent"] for i in range(world)]
    for res in shared + indep:
        assert res["neither_full_nor_zero"] == 0
        lo, hi = binomial_interval(len(res["mask"]), 0.7, 0.999)
        assert lo <= sum(res["mask"]) <= hi  # 30% lost
    assert all(s["mask"] == shared[0]["mask"] for s in shared)
    for i in range(1, world):
        agree = sum(a == b for a, b in zip(indep[0]["mask"], indep[i]["mask"], strict=True))
        n = len(indep[0]["mask"])
        lo, hi = binomial_interval(n, 0.7 * 0.7 + 0.3 * 0.3, 0.999)  # independent masks agree
        assert lo <= agree <= hi


def test_rescale_is_unbiased(runs):
    _, ranks = runs
    r = ranks[0]["rescale_unbiased"]
    for point in ("worker", "post"):
        assert r[point]["mean_ratio"] == pytest.approx(1.0, abs=0.01), point


def test_loss_zero_is_bitwise_ddp(runs):
    world, ranks = runs
    for rank in range(world):
        r = ranks[rank]["bitwise_loss0"]
        assert r.pop("lossy_differs") is True
        assert all(r.values()), r


def test_accumulation_views_and_counts_transport(runs):
    world, ranks = runs
    r = ranks[0]["accumulation_and_views"]
    assert r["steps"] == 6  # 3 micro-batches per step with no_sync: one hook round per step
    assert r["view_equal"]
    if world == 2:  # a 2-term sum is order-free; at W=4 Gloo chunks the longer payload differently
        assert r["append_equal"]
    assert r["append_max_rel_diff"] < 1e-5
    # regenerating the other ranks' masks locally gives exactly the counts the allreduce gives;
    # W / c_j is then folded into the pre-allreduce factor: bitwise equal where every W / c_j
    # is a power of two (W = 2), else equal up to rounding (4/3 at W = 4)
    if world == 2:
        assert r["regenerate_equal"] and r["regenerate_ge_equal"]
    assert r["regenerate_max_rel_diff"] < 1e-5
    # "auto": regenerate on CPU with <= 4 ranks, separate beyond (cap lowered to W-1 to see it),
    # the same results as the explicit choice, and the choice survives a pickle round trip
    assert r["auto_in_use"] == ["regenerate", "separate"]
    assert r["auto_equal"] == [True, True]
    assert r["auto_resumed_in_use"] == "separate"
    assert r["unrecovered"][0] == r["unrecovered"][1] > 0
    total_sent = sum(ranks[i]["accumulation_and_views"]["stats_own"]["packets_sent"] for i in range(world))
    total_lost = sum(ranks[i]["accumulation_and_views"]["stats_own"]["packets_lost"] for i in range(world))
    assert r["stats_all"]["packets_sent"] == total_sent
    assert r["stats_all"]["packets_lost"] == total_lost
    # per bucket: sent = packets x steps in which the bucket existed; buckets are re-keyed after
    # DDP's first-iteration rebuild
    buckets = r["buckets"]
    assert sum(b["worker_sent"] for b in buckets) == r["stats_own"]["packets_sent"]
    first = [b for b in buckets if b["worker_sent"] == b["packets"]]
    assert len(first) == 1  # the single pre-rebuild bucket, used once
    for b in buckets:
        assert b["worker_sent"] in (b["packets"], 5 * b["packets"])


def test_pickled_state_resumes_the_same_loss_sequence(runs):
    world, ranks = runs
    for rank in range(world):
        r = ranks[rank]["pickle_resume"]
        assert r["compared"] == 7
        assert r["same_sequence"]
        assert r["no_warmup_differs"]
        assert r["regenerate_same_sequence"]


def test_fidelity_measurement(runs):
    _, ranks = runs
    r = ranks[0]["fidelity"]
    assert [s["step"] for s in r["0.0"]] == [0, 1, 2, 3]
    assert all(s["cosine"] == pytest.approx(1.0, abs=1e-12) and s["rel_l2"] == 0.0 for s in r["0.0"])
    assert all(0.5 < s["cosine"] < 0.999 and s["rel_l2"] > 0.01 for s in r["0.2"])


def test_loss_by_parameter_maps_packets_to_parameters(runs):
    world, ranks = runs
    r = ranks[0]["layer_accounting"]
    first, last = r["order"]  # buffer order after DDP's rebuild
    size = {"ws.0": 150, "ws.1": 100}
    # packets of 100 elements over [first | last]: only packet 2 (the tail) is ever lost,
    # and it belongs to the last parameter; packet 1 is shared when the first has 150 elements
    n_first = (size[first] - 1) // 100 + 1
    n_last = 3 - size[first] // 100
    assert r["rows"][first] == [10 * n_first, 0]
    assert r["rows"][last] == [10 * n_last, 10]
    assert r["all_ranks"][last] == 10 * world


def test_stale_fill_holds_the_last_received_finite_value(runs):
    """A packet lost after the collective with fill='stale' holds exactly the value it had
    the last step it was received with a finite value (0 before that); received packets
    are exactly the lossless result, even after a step that overflowed to inf."""
    world, ranks = runs
    for rank in range(world):
        r = ranks[rank]["stale_rules"]
        assert r["non_uniform"] == 0
        t_inf, j_inf = r["inject"]
        last = [0.0] * len(r["masks"][0])
        lost_later = 0
        for t, (mask, got) in enumerate(zip(r["masks"], r["values"], strict=True)):
            lossless = (t + 1) * world * (world + 1) / 2
            for j, received in enumerate(mask):
                want = (math.inf if (t, j) == (t_inf, j_inf) else lossless) if received else last[j]
                assert got[j] == want, (rank, t, j, got[j], want)
                if received and math.isfinite(want):
                    last[j] = want
                lost_later += int(not received and t > t_inf and j == j_inf)
        assert not any(math.isnan(v) for row in r["values"] for v in row)
        assert lost_later >= 1  # the overflowed packet was lost afterwards: filled with a finite value
        assert r["masks"][t_inf][j_inf] == 1 and r["masks"][t_inf + 1][j_inf] == 0


def test_post_rescale_is_exact_for_fixed_count_models(runs):
    """ExactCount loses floor(0.3 * 7) = 2 and TailDrop ceil(0.3 * 7) = 3 of 7 packets: the
    survivors are divided by the fraction kept, 5/7 and 4/7, so every step's bucket mean
    equals the lossless one (was 1.020x and 0.816x with 1/(1-p))."""
    _, ranks = runs
    r = ranks[0]["fixed_count_rescale"]
    for name, kept in (("exact", 5), ("tail", 4)):
        assert r[name]["ratios"] == pytest.approx([1.0] * r[name]["steps"], rel=1e-6), name
        assert r[name]["values"] == [pytest.approx(7 / kept)], name
    steps = r["exact"]["steps"]
    lo, hi = binomial_interval(steps, 5 / 7, 0.999)
    assert all(lo <= c <= hi for c in r["exact"]["received"])  # each packet kept w.p. 5/7
    assert r["tail"]["received"] == [steps] * 4 + [0] * 3  # the tail is never received


def test_each_rank_has_its_own_stream(runs):
    """A replayed trace starts at an offset of each rank's own: uplink losses are not the
    same packets on every rank (all ranks lose a packet about p^W of the time); tail drop
    is the same on every rank by nature."""
    world, ranks = runs
    r = ranks[0]["per_rank_streams"]
    trace, tail, p = r["trace"], r["tail"], r["trace_rate"]
    assert not trace["identical_masks"]
    for lost in trace["lost_per_rank"]:
        lo, hi = binomial_interval(trace["total"], p, 0.999)
        assert lo <= lost <= hi
    lo, hi = binomial_interval(trace["total"], p**world, 0.999)
    assert lo <= trace["all_lost"] <= hi
    assert tail["identical_masks"]
    assert tail["all_lost"] == tail["lost_per_rank"][0] == 150 * 2  # ceil(0.1 * 20) per step


def test_rebuilt_buckets_get_their_own_accounting_and_stale_buffer(runs):
    """Without a warm-up: DDP's first-iteration bucket [ws.0 | ws.1] is rebuilt with the same
    index and size as [ws.1 | ws.0]. Tail drop loses packet 2 of 3 (elements 200-249): ws.1
    at step 1, ws.0 at the 9 steps after the rebuild."""
    _, ranks = runs
    r = ranks[0]["rebuilt_buckets"]
    assert r["orders"] == [["ws.0", "ws.1"], ["ws.1", "ws.0"]]  # DDP's layouts (the premise)
    # sent: first layout ws.0 in packets 0-1, ws.1 in 1-2; rebuilt ws.1 in 0, ws.0 in 1-2
    assert r["rows"] == {"ws.0": [2 + 9 * 2, 9], "ws.1": [2 + 9 * 1, 1]}
    # stale: step 1 received, step 2 all lost in a bucket of new content: nothing received
    # for it yet (0, not the other parameters' values); step 3 received, step 4 lost: each
    # parameter holds its own step-3 value, (i + 1) * 3 * W
    assert r["stale_orders"] == [["ws.0", "ws.1", "ws.2"], ["ws.2", "ws.1", "ws.0"]]
    world = len(ranks)
    g = r["stale_grads"]
    assert g[0] == [(i + 1) * 1 * world for i in range(3)]
    assert g[1] == [0.0, 0.0, 0.0]
    assert g[2] == g[3] == [(i + 1) * 3 * world for i in range(3)]
    # resumed from the checkpoint taken before step 4 (saved keys (0, 300, 0) and (0, 300, 1),
    # same index and parameter sizes): the rebuilt bucket takes over generation 1, the most
    # recent, and step 4 (all lost) delivers its step-3 values, not the zeros of generation 0
    assert r["resumed_grads"] == g[3]
    assert r["resumed_keys"] == [[0, 300, 1]]


def test_resync_includes_optimizer_momentum(runs):
    world, ranks = runs
    w = [ranks[i]["resync_momentum"] for i in range(world)]
    for part in ("synced", "momentum", "after"):
        assert all(x["with_optimizer"][part] == w[0]["with_optimizer"][part] for x in w), part
    # parameters alone: identical right after the broadcast, apart again one step later
    assert all(x["params_only"]["synced"] == w[0]["params_only"]["synced"] for x in w)
    assert any(x["params_only"]["after"] != w[0]["params_only"]["after"] for x in w)


def test_append_counts_refused_where_the_dtype_cannot_count(runs):
    world, ranks = runs
    for rank in range(world):
        msg = ranks[rank]["append_exactness"]["message"]
        assert "counts_transport='append'" in msg and "separate" in msg, msg


def test_no_host_sync_on_any_path(runs):
    """Dynamic check (tests/multiprocess/host_sync_guard.py): no call that would wait for a GPU (.item(),
    .tolist(), .cpu(), .numpy(), bool/int/float of a tensor, nonzero, one-argument where,
    boolean-mask indexing, print) happens in the hook or its callbacks, on any path."""
    world, ranks = runs
    for rank in range(world):
        found = ranks[rank]["no_host_sync"]
        assert len(found) == 23
        assert all(v == [] for v in found.values()), {k: v for k, v in found.items() if v}


def _subsets(world: int) -> dict[int, int]:
    """sum of 2**r over each non-empty subset of ranks -> its size."""
    return {sum(2**r for r in range(world) if m >> r & 1): bin(m).count("1") for m in range(1, 2**world)}


def test_worker_rescale_with_sum_is_w_over_c_times_the_arrived_sum(runs):
    """With reduction='sum' and worker rescale, a packet whose copies from the ranks in S
    arrived is (W/|S|) * sum_{r in S} g_r: a packet only rank r's copy reached is W * g_r;
    one no copy reached is 0, and those are exactly the packets counted unrecovered."""
    world, ranks = runs
    r = ranks[0]["rule_values"]["worker_rescale_sum"]
    allowed = {world / size * total for total, size in _subsets(world).items()}
    values = r["values"]
    assert all(v == 0.0 or any(v == pytest.approx(a, rel=1e-6) for a in allowed) for v in values)
    zeros = sum(v == 0.0 for v in values)
    assert r["unrecovered"] == zeros
    assert r["unrecovered_all"] == world * zeros
    lo, hi = binomial_interval(len(values), 0.4**world, 0.999)
    assert lo <= zeros <= hi
    for q in range(world):  # only rank q's copy arrived: W * 2**q, at rate (1-p) p^(W-1)
        alone = sum(v == world * 2**q for v in values)
        lo, hi = binomial_interval(len(values), 0.6 * 0.4 ** (world - 1), 0.999)
        assert lo <= alone <= hi, (q, alone)


def test_both_drop_points_with_a_shared_post_mask(runs):
    """drop_point='both', shared post mask, zero fill: a packet is 0 when the post drop lost
    it (p) or no copy arrived ((1-p) p^W); else the sum of the copies that arrived. Every rank
    gets the same values, and the post counter counts the post drops."""
    world, ranks = runs
    results = [ranks[i]["rule_values"]["both_zero_shared"] for i in range(world)]
    values = results[0]["values"]
    assert all(x["values"] == values for x in results)
    assert all(v == 0.0 or v in _subsets(world) for v in values)
    zeros = sum(v == 0.0 for v in values)
    p = 0.3
    lo, hi = binomial_interval(len(values), p + (1 - p) * p**world, 0.999)
    assert lo <= zeros <= hi
    assert results[0]["post_lost"] <= zeros
    lo, hi = binomial_interval(len(values), p, 0.999)
    assert lo <= results[0]["post_lost"] <= hi


def test_independent_post_rescale_divides_by_the_keep_rate(runs):
    """post_sync='independent', fill='rescale': each rank's received packets are exactly
    R / (1 - p) (R = sum of 2**r = 2^W - 1), its lost ones 0, masks differ between ranks."""
    world, ranks = runs
    results = [ranks[i]["rule_values"]["post_rescale_independent"] for i in range(world)]
    full = (2**world - 1) / 0.75
    for x in results:
        assert all(v == 0.0 or v == pytest.approx(full, rel=1e-6) for v in x["values"])
        assert sum(v == 0.0 for v in x["values"]) == x["lost"] > 0
    assert any(x["values"] != results[0]["values"] for x in results)


def test_fidelity_is_cosine_and_relative_l2_against_the_lossless_gradient(runs):
    """cos = <x, y> / (|x| |y|) and rel_l2 = |x - y| / |y|, x the delivered (lossy) gradient
    and y the lossless mean, (W + 1)/2 in every element (to fp32 rounding: rel 1e-6)."""
    world, ranks = runs
    r = ranks[0]["rule_values"]["fidelity"]
    y = (world + 1) / 2
    assert [rec["step"] for rec in r["records"]] == list(range(5))
    for x, rec in zip(r["delivered"], r["records"], strict=True):
        dot = sum(v * y for v in x)
        nx, ny = math.sqrt(sum(v * v for v in x)), y * math.sqrt(len(x))
        assert rec["cosine"] == pytest.approx(dot / (nx * ny), rel=1e-6)
        assert rec["rel_l2"] == pytest.approx(math.sqrt(sum((v - y) ** 2 for v in x)) / ny, rel=1e-6)
        assert rec["rel_l2"] > 0.05


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_buckets(runs, dtype):
    """fp16/bf16 buckets: packets of mtu // 2 elements; worker rescale delivers (W/c) x the
    arrived sum (W/c applied in fp32, then rounded to the dtype), post stale fill only ever shows the full sum
    or 0 (nothing received yet), never a mixture."""
    world, ranks = runs
    r = ranks[0]["half_buckets"][dtype]
    tol = 2**-7 if dtype == "bfloat16" else 2**-10
    allowed = {world / size * total for total, size in _subsets(world).items()}
    rescale = r["worker_rescale"]
    assert rescale["stats"]["buckets"][-1]["packets"] == 16  # 1024 elements / (128 B / 2 B)
    values = rescale["values"]
    assert all(v == 0.0 or any(v == pytest.approx(a, rel=tol) for a in allowed) for v in values)
    assert sum(v == 0.0 for v in values) == rescale["stats"]["worker"]["packets_unrecovered"]
    stale = r["post_stale"]["values"]
    full = 2**world - 1
    assert set(stale) <= {0.0, float(full)} and stale.count(float(full)) > len(stale) // 2


def test_exact_count_and_four_state_per_rank_inside_the_hook(runs):
    """Worker drop: ExactCount loses exactly floor(0.3 * 20) = 6 of each rank's 20 packets per
    step, a subset of its own (ranks lose a packet together at (6/20)^W); the four-state chain
    loses at its long-run rate on every rank (99.9% interval of the chain's asymptotic
    variance) with masks of its own."""
    world, ranks = runs
    r = ranks[0]["per_rank_streams"]
    exact = r["exact"]
    assert exact["lost_per_rank"] == [150 * 6] * world
    assert not exact["identical_masks"]
    lo, hi = binomial_interval(exact["total"], 0.3**world, 0.999)
    assert lo <= exact["all_lost"] <= hi
    state = r["state"]
    chain = MarkovFourState(0.05, 0.4, 0.2, 0.5, 0.01)
    lo, hi = markov_loss_interval(chain.transition_matrix, chain.loss_probabilities, state["total"])
    assert all(lo <= lost / state["total"] <= hi for lost in state["lost_per_rank"]), state["lost_per_rank"]
    assert not state["identical_masks"]


def _arrival_sets(world: int, fill: str) -> dict[float, frozenset[int]]:
    """The value a worker-dropped packet takes (sum reduction, rank r sends 2^r) -> the set
    of ranks whose copies arrived: the sum (zero fill) or W/|A| times it (rescale)."""
    out = {}
    for m in range(1, 2**world):
        a = frozenset(r for r in range(world) if m >> r & 1)
        total = float(sum(2**r for r in a))
        out[total if fill == "zero" else world / len(a) * total] = a
    return out


def _lookup(u: float, table: dict[float, frozenset[int]]) -> frozenset[int] | None:
    for value, a in table.items():
        if u == pytest.approx(value, rel=1e-6):
            return a
    return None


def test_every_drop_point_post_sync_fill_and_counts_transport_delivers_its_values(runs):
    """W = 3, loss 30% at each drop point, 20 packets x 40 steps, rank r sending (t+1) 2^r.
    For each of the 42 configurations, every delivered packet u = value / (t + 1) is: with a
    worker drop, the arrived sum (zero) or W/|A| times it (rescale) for the set A of copies
    that arrived, the same on every rank; without one, the lossless 2^W - 1; then a post drop
    keeps it (times 1/(1-p) under rescale) or zeroes it, with one mask on all ranks (shared)
    or each rank's own (independent); stale keeps the last value this rank received. Rates:
    each rank's copy arrives at (1 - p) / (1 - p^W) given that any did, post losses at p per rank, ranks'
    independent post masks differ at 2p(1-p)."""
    world, ranks = runs
    if world != 3:
        assert ranks[0]["combinations"] == {}
        return
    p, q, steps, packets = 0.3, 0.7, 40, 20
    configs = ranks[0]["combinations"]
    assert len(configs) == 42  # 3 drops x 2 syncs x (2 fills + stale for post) x 3 transports
    full = 2**world - 1

    def inside(count: int, n: int, rate: float) -> bool:
        lo, hi = binomial_interval(n, rate, 0.999)
        return lo <= count <= hi

    for name, res0 in configs.items():
        drop, sync, fill, counts = name.split("/")
        assert res0["counts_in_use"] == counts, name
        v = np.array([r["combinations"][name]["values"] for r in ranks])  # (rank, step, packet)
        assert v.shape == (world, steps, packets), name
        u = v / (np.arange(steps) + 1.0)[None, :, None]
        worker, post = drop in ("worker", "both"), drop in ("post", "both")
        factor = 1 / q if post and fill == "rescale" else 1.0
        table = _arrival_sets(world, fill) if worker else {float(full): frozenset(range(world))}
        table = {value * factor: a for value, a in table.items()}
        if post and sync == "shared":  # one post mask: every rank gets the same values
            assert (v == v[0]).all(), name
        if fill == "stale":
            for r in range(world):
                last = np.zeros(packets)
                for t in range(steps):
                    got = v[r, t] == full * (t + 1)
                    assert np.array_equal(v[r, t][~got], last[~got]), (name, r, t)  # the last received
                    last = np.where(got, v[r, t], last)
                lost = int((v[r] != full * (np.arange(steps) + 1.0)[:, None]).sum())
                assert lost == ranks[r]["combinations"][name]["post_lost"], name
                assert inside(lost, steps * packets, p), (name, r, lost)
            continue
        members, observed = np.zeros(world, dtype=int), 0
        for t in range(steps):
            for j in range(packets):
                nonzero = [x for x in u[:, t, j] if x != 0]
                if not worker:
                    assert all(x == pytest.approx(full * factor, rel=1e-6) for x in nonzero), (name, t, j)
                if not nonzero:
                    continue
                a = _lookup(nonzero[0], table)
                assert a is not None, (name, t, j, nonzero[0])  # a value no rule gives
                assert all(x == pytest.approx(nonzero[0], rel=1e-6) for x in nonzero), (name, t, j)
                observed += 1
                for r in a:
                    members[r] += 1
        zeros = (u == 0).sum(axis=(1, 2))
        if worker:  # each rank's copy arrived at 1 - p, given that any did (and was seen)
            for r in range(world):
                assert inside(int(members[r]), observed, q / (1 - p**world)), (name, r, members)
        if post:
            p_zero = p + q * p**world if worker else p  # post lost, or no copy arrived
            for r in range(world):
                assert inside(int(zeros[r]), steps * packets, p_zero), (name, r, zeros)
            if not worker:
                counted = [ranks[r]["combinations"][name]["post_lost"] for r in range(world)]
                assert [int(z) for z in zeros] == counted, name
            if sync == "independent":  # rank 0 lost a packet rank 1 received, or the reverse
                differ = int(((u[0] == 0) != (u[1] == 0)).sum())
                seen = 1 - p**world if worker else 1.0  # a packet no copy reached is 0 on all
                assert inside(differ, steps * packets, 2 * p * q * seen), (name, differ)
        else:
            assert (zeros == zeros[0]).all() and inside(int(zeros[0]), steps * packets, p**world), name

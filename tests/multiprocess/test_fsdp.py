"""The lossy FSDP2 collectives (Gloo, W = 3, one launch): fsdp_worker.py calls them on
inputs whose values say who sent what, and inside real fully_shard training; these tests
check the numbers against the closed forms of lossy_hooks/fsdp.py's docs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from lossy_hooks import LossyState, fsdp
from lossy_hooks.core.statistics import binomial_interval

from ..launch import launch

WORKER = Path(__file__).with_name("fsdp_worker.py")
SCENARIOS = [
    "chain",
    "retransmit",
    "error_feedback",
    "scatter_worker",
    "scatter_post",
    "gather",
    "resume",
    "training",
    "layout",
    "no_host_sync",
    "bf16_factors",
]
WORLD = 3
CALLS, PACKETS = 200, 10  # calls per scenario, packets per row (1000 fp32 at mtu 400)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch(WORKER, WORLD, SCENARIOS, tmp_path_factory.mktemp("fsdp") / "results.json")


def inside(count: int, n: int, p: float) -> bool:
    lo, hi = binomial_interval(n, p, 0.999)
    return lo <= count <= hi


def arrivals(ranks) -> np.ndarray:
    """``a[j, t, i, q]``: rank q's copy of packet i of shard j arrived at call t, decoded from
    the zero-fill sums (rank q sends 2^q)."""
    v = np.stack([np.array(r["scatter_worker"]["zero"]["values"]).astype(int) for r in ranks])
    return (v[..., None] >> np.arange(WORLD)) & 1


def test_reduce_scatter_worker_drop_rates_independence_and_counts(ranks):
    a = arrivals(ranks)
    for j in range(WORLD):
        assert a[j, ..., j].all()  # the owner's own contribution never crosses the network
    lost = sum(1 - a[j, ..., q] for j in range(WORLD) for q in range(WORLD) if q != j).sum()
    sent = sum(r["scatter_worker"]["zero"]["sent"] for r in ranks)
    assert sent == WORLD * (WORLD - 1) * CALLS * PACKETS  # (W-1) rows of n packets per call
    assert lost == sum(r["scatter_worker"]["zero"]["lost"] for r in ranks)  # ledger = what arrived
    assert inside(int(lost), sent, 0.3)
    # per-rank masks are independent: both other senders of a shard's packet lost ~ p^2
    both = sum(((1 - a[j, ..., (j + 1) % 3]) * (1 - a[j, ..., (j + 2) % 3])).sum() for j in range(WORLD))
    assert inside(int(both), WORLD * CALLS * PACKETS, 0.3**2)
    for r in ranks:
        z = r["scatter_worker"]["zero"]
        assert z["steps"] == CALLS
        assert z["buckets"][0]["packets"] == PACKETS and z["buckets"][0]["numel"] == WORLD * 1000


def test_reduce_scatter_worker_rescale_is_the_mean_of_the_copies_that_arrived(ranks):
    a = arrivals(ranks)  # the same seed: the same masks as the zero-fill run
    expected = (a * 2.0 ** np.arange(WORLD)).sum(-1) / a.sum(-1)
    for transport in ("regenerate", "separate"):
        got = np.stack([np.array(r["scatter_worker"][transport]["values"]) for r in ranks])
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        assert sum(r["scatter_worker"][transport]["lost"] for r in ranks) == (1 - a).sum()


def test_reduce_scatter_post_drop_fills(ranks):
    full = (np.arange(CALLS) + 1.0)[:, None] * (2**WORLD - 1)  # the lossless shard at call t
    for sync in ("shared", "independent"):
        for fill in ("zero", "rescale", "stale"):
            res = [r["scatter_post"][f"{fill}-{sync}"] for r in ranks]
            sent = sum(x["sent"] for x in res)
            assert sent == WORLD * CALLS * PACKETS
            lost_total = sum(x["lost"] for x in res)
            assert inside(lost_total, sent, 0.25)
            for x in res:
                v = np.array(x["values"])
                if fill == "zero":
                    lost = v == 0
                    np.testing.assert_array_equal(v[~lost], np.broadcast_to(full, v.shape)[~lost])
                elif fill == "rescale":  # received packets divided by the kept fraction 1 - p
                    lost = v == 0
                    np.testing.assert_allclose(
                        v[~lost], np.broadcast_to(full / 0.75, v.shape)[~lost], rtol=1e-6
                    )
                else:  # stale: a lost packet holds the last value received for it (0 before)
                    lost = v != full
                    last = np.zeros(PACKETS)
                    for t in range(CALLS):
                        np.testing.assert_array_equal(v[t][lost[t]], last[lost[t]])
                        last = np.where(lost[t], last, full[t])
                assert lost.sum() == x["lost"]
                if sync == "shared":  # rank r loses row r of the one (W, n) mask per call
                    draw = np.array(ranks[0]["scatter_post"]["shared_draw"], dtype=bool)  # [t, rank, i]
                    for j, r in enumerate(ranks):
                        got = np.array(r["scatter_post"][f"{fill}-{sync}"]["values"]) == 0
                        if fill == "stale":
                            got = np.array(r["scatter_post"][f"{fill}-{sync}"]["values"]) != full
                        np.testing.assert_array_equal(got, draw[:, j])
                    assert (draw[:, 0] != draw[:, 1]).any()  # rows differ: ranks lose other packets


def test_all_gather_receivers_lose_other_ranks_packets(ranks):
    true = 1000.0 * (np.arange(CALLS) + 1)[:, None] + np.arange(WORLD)[None, :]  # [t, sender]
    zero_lost = {}
    for fill in ("zero", "stale"):
        for sync in ("independent", "shared"):
            lost_by = []
            for j, r in enumerate(ranks):
                x = r["gather"][f"{fill}-{sync}"]
                v = np.array(x["values"])  # [t, sender, packet]
                ok = v == true[:, :, None]
                assert ok[:, j].all()  # a rank's own shard is never lost
                lost = ~ok
                if fill == "zero":
                    assert (v[lost] == 0).all()
                else:  # the last value received; the first gather's values before any loss
                    last = true[0][:, None].repeat(PACKETS, 1)
                    for t in range(CALLS):
                        np.testing.assert_array_equal(v[t][lost[t]], last[lost[t]])
                        last = np.where(lost[t], last, true[t][:, None])
                    # the same seed as the zero fill: the same masks (a loss at the first
                    # gather is invisible: the stale copy is the first gather's values)
                    np.testing.assert_array_equal(lost[1:], zero_lost[sync, j][1:])
                    lost = zero_lost[sync, j]
                zero_lost[sync, j] = lost
                assert lost.sum() == x["lost"] and x["sent"] == (WORLD - 1) * CALLS * PACKETS
                lost_by.append(lost)
            total = sum(int(lost.sum()) for lost in lost_by)
            assert inside(total, WORLD * (WORLD - 1) * CALLS * PACKETS, 0.2)
            # rank 0's shard reaches ranks 1 and 2: lost for both together ~p^2 when
            # independent; always together when shared (the sender's packet is lost)
            both = (lost_by[1][:, 0] & lost_by[2][:, 0]).sum()
            if sync == "shared":
                assert (lost_by[1][:, 0] == lost_by[2][:, 0]).all() and both > 0
            else:
                assert inside(int(both), CALLS * PACKETS, 0.2**2)


def test_state_dict_resumes_the_loss_sequence(ranks):
    for r in ranks:
        res = r["resume"]
        assert res["same_first_half"] and res["resumed_equal"] and res["fresh_differs"]
        assert res["steps"] == 20


def test_fully_shard_training(ranks):
    for r in ranks:
        t = r["training"]
        assert t["wired"] == ["(root)", "0", "3", "5"]  # the root holds the LayerNorm
        assert t["bitwise"]  # loss 0, both collectives wired: bitwise plain FSDP2
        assert t["lossless_steps"] == 6 and t["lossless_sent"] > 0 and t["gather_sent"] > 0
        assert t["lossless_sent"] % (6 * (WORLD - 1)) == 0
        assert t["sum_max_diff"] < 1e-6  # reduction="sum": W times the gradient
        assert t["grouped"] == ["(root)", "0"]  # fully_shard([m[0], m[3]]): one unit, named by m[0]
        first, last = t["lossy_first_last"]
        assert last < first  # still learns at 20% gradient and 10% parameter loss
        assert t["lossy_steps"] == 24
        w, g = t["lossy_worker"], t["lossy_gather"]
        assert inside(w["packets_lost"], w["packets_sent"], 0.2) and w["packets_unrecovered"] == 0
        assert inside(g["packets_lost"], g["packets_sent"], 0.1)


def test_no_host_sync_on_any_path(ranks):
    """The hot path of both collectives under tests/multiprocess/host_sync_guard.py (what would wait for
    a GPU raises): nothing attempted, on any configuration."""
    for r in ranks:
        assert len(r["no_host_sync"]) == 12
        assert all(seen == [] for seen in r["no_host_sync"].values()), r["no_host_sync"]


def test_fsdp_layout_predicts_the_real_shards(ranks):
    """bucket_layout --strategy fsdp: FSDP's padding rule applied without a process group
    gives the reduce-scatter buffers and packets the real run counted (gpt-tiny, W = 3:
    the 256-row embedding and head are padded to 258 rows)."""
    for r in ranks:
        lay = r["layout"]
        by_label = {u[0]: (u[1], u[2]) for u in lay["predicted"]}
        assert [list(by_label[label]) for label in lay["labels"]] == lay["seen"]
        assert by_label["(root)"][0] == 258 * 64 * 2 + 66 * 64 + 2 * 66  # tok, head, pos, ln_f
        assert len(lay["seen"]) == 3


def test_retransmission_under_fsdp_leaves_p_squared_lost_and_counts_the_resends(ranks):
    """retransmit=1 at p = 0.3: a contribution stays lost with p^2 (decoded from the zero-fill
    sums: rank q sends 2^q; the owner's own row never lost); every first loss is resent once
    (extra_packets) and the resends that arrive are counted as recovered; a post drop
    rescales by 1 / (1 - p^2), with a shared mask and with independent ones."""
    v = np.stack([np.array(r["retransmit"]["worker"]["values"]).astype(int) for r in ranks])
    a = (v[..., None] >> np.arange(WORLD)) & 1
    for j in range(WORLD):
        assert a[j, ..., j].all()
    lost = sum((1 - a[j, ..., q]).sum() for j in range(WORLD) for q in range(WORLD) if q != j)
    sent = WORLD * (WORLD - 1) * CALLS * PACKETS
    stats = [r["retransmit"]["worker"]["stats"] for r in ranks]
    assert sum(s["packets_sent"] for s in stats) == sent
    assert sum(s["packets_lost"] for s in stats) == lost
    assert inside(int(lost), sent, 0.09)
    resent = sum(s["extra_packets"] for s in stats)
    assert inside(resent, sent, 0.3)  # first losses, each resent once
    assert resent - sum(s["recovered_retransmit"] for s in stats) == lost
    full = 2**WORLD - 1
    for sync in ("shared", "independent"):
        got = np.array([r["retransmit"][sync]["values"] for r in ranks])  # (rank, call, packet)
        kept = got != 0
        assert np.allclose(got[kept], full / (1 - 0.09))
        n_lost = sum(r["retransmit"][sync]["stats"]["packets_lost"] for r in ranks)
        assert n_lost == (~kept).sum()
        assert inside(int(n_lost), got.size, 0.09)


def test_error_feedback_under_fsdp_delivers_every_gradient_late_not_never(ranks):
    """Error feedback at 30%: for shard j's packet i, what arrived over the calls plus what
    the ranks still owe it equals every contribution sent, exactly (rank q sends 2^q each
    call); packets were lost all the same; a state loaded from a state_dict continues with
    the same residuals and losses."""
    full = 2**WORLD - 1
    for j, r in enumerate(ranks):
        arrived = np.array(r["error_feedback"]["outs"]).sum(0)  # per packet of shard j
        owed = sum(np.array(other["error_feedback"]["owed"][j]) for other in ranks)
        assert np.array_equal(arrived + owed, np.full(PACKETS, CALLS * full))
        assert r["error_feedback"]["lost"]["packets_lost"] > 0
        assert r["error_feedback"]["resumed_same"]
        assert np.array(r["error_feedback"]["owed"][j]).sum() == 0  # the own row is never lost


@pytest.mark.parametrize(
    "kwargs, collective, words",
    [
        (dict(fec=(8, 1)), "reduce-scatter", "fec"),
        (dict(packetization="tensor"), "reduce-scatter", "packetization"),
        (dict(counts_transport="append"), "reduce-scatter", "append"),
        (dict(encoding="hadamard"), "all-gather", "encoding"),
        (dict(wire_dtype="bf16"), "all-gather", "MixedPrecisionPolicy"),
        (dict(measure_fidelity=True), "all-gather", "measure_fidelity"),
    ],
)
def test_settings_fsdp_cannot_honour_are_refused(kwargs, collective, words):
    fill = dict(drop_point="post", fill="zero") if collective == "all-gather" else {}
    with pytest.raises(ValueError, match=words):
        fsdp.check_state(LossyState(loss_rate=0.1, **(fill | kwargs)), collective)


@pytest.mark.parametrize(
    "kwargs", [dict(encoding="hadamard"), dict(wire_dtype="bf16"), dict(measure_fidelity=True)]
)
def test_the_reduce_scatter_runs_the_technique_chain(kwargs):
    fsdp.check_state(LossyState(loss_rate=0.1, **kwargs), "reduce-scatter")  # no longer refused


def test_hadamard_wire_dtype_and_fidelity_under_the_reduce_scatter(ranks):
    """Hadamard: at loss 0 the decode (this rank's row's signs) is the lossless sum within
    round-off (4 b eps, b = 8); with 30% loss and rescale, the mean of 200 calls within 5
    standard errors at every element (1000 elements) of the closed form of fsdp.py's
    rescale, ``E[W/c] g_jj + sum_{r != j} E[W a_r / c] g_rj`` (the owner's copy always
    arrives, ``c = 1 + Bin(W-1, 1-p)``): rotation, rescale and decode commute with the
    expectation. A bf16 wire: the reduce-scatter of the bf16 rows, not the fp32 one.
    Fidelity: rank r's sums over its own shard; with all_ranks over the whole vector."""
    import torch

    p, q = 0.3, 0.7
    owner = sum(math.comb(WORLD - 1, k) * q**k * p ** (WORLD - 1 - k) * WORLD / (1 + k) for k in range(WORLD))
    other = q * sum(
        math.comb(WORLD - 2, k) * q**k * p ** (WORLD - 2 - k) * WORLD / (2 + k) for k in range(WORLD - 1)
    )
    rows = [
        torch.randn(WORLD, 1000, generator=torch.Generator().manual_seed(100 + r)).double()
        for r in range(WORLD)
    ]
    for j, r in enumerate(ranks):
        c = r["chain"]
        assert c["hadamard_rel_err"] < 4 * 8 * 2**-24
        expected = sum((owner if s == j else other) * rows[s][j] for s in range(WORLD))
        z = (torch.tensor(c["hadamard_mean"]).double() - expected).abs() / torch.tensor(c["hadamard_stderr"])
        assert c["hadamard_lost"] > 0 and float(z.max()) < 5.0
        assert c["bf16_equal"] and not c["fp32_equal"]
        (fid,) = c["fidelity"]
        dot, xx, yy = c["zero_sums"]
        assert fid["cosine"] == pytest.approx(dot / (xx * yy) ** 0.5, rel=1e-9) and fid["cosine"] < 0.99
    dot, xx, yy = (sum(r["chain"]["zero_sums"][i] for r in ranks) for i in range(3))
    for r in ranks:
        (fid,) = r["chain"]["fidelity_all"]
        assert fid["cosine"] == pytest.approx(dot / (xx * yy) ** 0.5, rel=1e-9)


def test_register_refuses_what_it_cannot_wire():
    with pytest.raises(ValueError, match="fill 'stale' or 'zero'"):
        fsdp.gather_state(loss_rate=0.1, fill="rescale")
    with pytest.raises(ValueError, match="drop_point='post'"):
        fsdp.check_state(LossyState(loss_rate=0.1, drop_point="worker", fill="zero"), "all-gather")
    with pytest.raises(TypeError, match="fully_shard"):
        fsdp.register(nn.Linear(2, 2), LossyState(loss_rate=0.1))


def test_bf16_shards_get_fp32_rescale_factors(ranks):
    import torch

    full = float(2**WORLD - 1)  # the sum of 2^r
    exact = torch.tensor(full / 0.9, dtype=torch.float32).to(torch.bfloat16).item()
    rounded = (torch.tensor(full, dtype=torch.bfloat16) * torch.tensor(1 / 0.9).to(torch.bfloat16)).item()
    assert exact != rounded  # the case tells the two apart
    for r in ranks:
        assert r["bf16_factors"]["values"] == [0.0, exact]  # lost packets 0, received rescaled once

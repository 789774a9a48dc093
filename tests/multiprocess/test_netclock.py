"""The simulated network clock and the deadline loss model against their closed forms
(lossy_hooks/core/network.py's docs): the alpha-beta ring time exactly, loss rates from the
delay CDFs, the reliable transport's tail from the geometric resends, one clock on every
rank, and exact resumption."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lossy_hooks import LossyState
from lossy_hooks.core.netclock import SimClock
from lossy_hooks.core.network import NetworkModel
from lossy_hooks.core.statistics import binomial_interval
from lossy_hooks.loss_models import DeadlineLoss, parse_loss_model
from lossy_hooks.loss_models.deadline import Deadline

W, N, PACKET = 4, 500, 1500  # ranks, packets per collective, bytes per packet
NBYTES = N * PACKET


def clock(network: NetworkModel, deadline: str | None = None, seed: int = 0, world: int = W) -> SimClock:
    c = SimClock(network, Deadline.parse(deadline) if deadline else None)
    c.prepare(torch.device("cpu"), seed, world)
    return c


def inside(count: int, n: int, p: float) -> bool:
    lo, hi = binomial_interval(n, p, 0.999)
    return lo <= count <= hi


def test_no_jitter_gives_the_alpha_beta_ring_time_exactly():
    net = NetworkModel(bandwidth_gbps=25, latency_us=7)
    t0 = 2 * (W - 1) * (7e-6 + NBYTES / (W * 25e9 / 8))
    assert net.ring_seconds(NBYTES, W) == t0
    c = clock(net, "1.5x")
    for _ in range(3):
        c.tick(N, NBYTES, PACKET)
    got = c.read()
    assert got["sim_lossfree_s"] == got["sim_comm_s"] == got["sim_reliable_s"] == 3 * t0
    assert not c.lost.any()  # every packet at T_0 < 1.5 T_0
    assert net.deadline_loss_probability(0.0, net.ring_seconds(NBYTES, 1), 1) == 0.0  # one rank: none late
    one = clock(net, world=1)
    one.tick(N, NBYTES, PACKET)
    assert one.read()["sim_comm_s"] == 0.0 and not one.lost_row(0, N).any()


@pytest.mark.parametrize(
    "network, deadline",
    [
        (NetworkModel(bandwidth_gbps=10, latency_us=5, jitter="lognormal 4 1"), "1.2x"),
        (NetworkModel(bandwidth_gbps=10, latency_us=5, jitter="pareto 50 1.5"), "1100us"),
        (NetworkModel(bandwidth_gbps=10, jitter="lognormal 4.5 0.5", drop_rate=0.02), "2x"),
    ],
    ids=["lognormal-relative", "pareto-absolute", "lognormal-drops"],
)
def test_deadline_loss_rate_is_the_delay_cdf_at_the_deadline(network, deadline):
    c = clock(network, deadline)
    lost = sent = 0
    for _ in range(60):
        c.tick(N, NBYTES, PACKET)
        lost += int(c.lost.sum())
        sent += c.lost.numel()
    d = Deadline.parse(deadline).seconds(network.ring_seconds(NBYTES, W))
    p = network.deadline_loss_probability(d, network.ring_seconds(NBYTES, W), W)
    assert 0.01 < p < 0.9  # the cases are chosen to lose a fair share
    assert inside(lost, sent, p), (lost, sent, p)
    model = parse_loss_model(f"deadline {deadline}")
    model.bind(c, 0)
    assert model.bucket_keep_fraction(N, NBYTES) == pytest.approx(1 - p)
    with pytest.raises(ValueError, match="depends on the bucket's bytes"):
        model.keep_fraction(N)


def test_straggler_mixture_rate_over_many_calls():
    """With stragglers the losses of one rank's row are correlated (the row is late
    together): the rate over calls is the mixture, checked by rows' late fractions."""
    net = NetworkModel(jitter="lognormal 3 0.5", straggler_prob=0.25, straggler_factor=3)
    c = clock(net, "2x")
    t0 = net.ring_seconds(NBYTES, W)
    slow_rows = fast_lost = fast_sent = 0
    calls = 400
    for _ in range(calls):
        c.tick(N, NBYTES, PACKET)
        frac = c.lost.float().mean(1)
        slow = frac > 0.99  # a straggler at 3 T_0 is past 2 T_0: its whole row is lost
        slow_rows += int(slow.sum())
        fast_lost += int(c.lost[~slow].sum())
        fast_sent += int((~slow).sum()) * N
    assert inside(slow_rows, calls * W, 0.25)
    fast_rate = 1 - net.delay_cdf(2 * t0 - t0)
    assert inside(fast_lost, fast_sent, fast_rate)
    # the closed form is the mixture: a straggler at 3 T_0 misses a 2 T_0 deadline entirely
    assert net.deadline_loss_probability(2 * t0, t0, W) == pytest.approx(0.25 + 0.75 * fast_rate)


def test_reliable_transport_tail_is_the_maximum_of_geometric_resends():
    """No jitter, drops p_0 = 0.1: T_reliable = T_0 + max K (RTO + b / beta) with
    P(max K <= k) = (1 - p_0^(k+1))^(W n); the empirical distribution of max K matches."""
    net = NetworkModel(bandwidth_gbps=10, latency_us=5, drop_rate=0.1, rto_us=200)
    n, calls = 50, 3000
    c = clock(net, world=W)
    t0 = net.ring_seconds(n * PACKET, W)
    resend = 200e-6 + PACKET / net.beta
    prev = 0.0
    ks = []
    for _ in range(calls):
        c.tick(n, n * PACKET, PACKET)
        now = c.read()["sim_reliable_s"]
        ks.append(round((now - prev - t0) / resend))
        prev = now
    ks = np.array(ks)
    packets = W * n
    for k in range(1, 5):
        p_le = (1 - 0.1 ** (k + 1)) ** packets
        assert inside(int((ks <= k).sum()), calls, p_le), (k, (ks <= k).mean(), p_le)
    mean_max = net.expected_max_resends(packets)
    assert abs(ks.mean() - mean_max) < 4 * ks.std() / math.sqrt(calls)
    assert c.read()["sim_comm_s"] == pytest.approx(calls * t0)  # no deadline: lossy = max t = T_0


def test_lossy_time_is_the_deadline_when_anything_is_lost():
    net = NetworkModel(bandwidth_gbps=10, jitter="pareto 20 1.2")
    c = clock(net, "1.1x")
    t0 = net.ring_seconds(NBYTES, W)
    before = 0.0
    for _ in range(20):
        c.tick(N, NBYTES, PACKET)
        now = c.read()
        step = now["sim_comm_s"] - before
        before = now["sim_comm_s"]
        if c.lost.any():
            assert step == pytest.approx(1.1 * t0)
        else:
            assert t0 <= step <= 1.1 * t0


def test_one_clock_for_every_rank_and_exact_resume():
    net = NetworkModel(jitter="lognormal 3 1", straggler_prob=0.1, straggler_factor=2, drop_rate=0.01)
    a, b = clock(net, "1.3x", seed=5), clock(net, "1.3x", seed=5)  # two ranks' clocks: same stream
    masks = []
    for _ in range(6):
        a.tick(N, NBYTES, PACKET)
        b.tick(N, NBYTES, PACKET)
        assert torch.equal(a.lost, b.lost)
        masks.append(a.lost.clone())
    assert a.read() == b.read()
    # the deadline models of different ranks read different rows of the same arrivals
    models = [DeadlineLoss("1.3x") for _ in range(W)]
    for r, m in enumerate(models):
        m.bind(a, r)
    rows = [m.sample(N, torch.Generator()) for m in models]
    assert all(torch.equal(rows[r], a.lost[r]) for r in range(W)) and not torch.equal(rows[0], rows[1])
    # resume: a state_dict after 3 calls continues exactly
    c = clock(net, "1.3x", seed=5)
    for _ in range(3):
        c.tick(N, NBYTES, PACKET)
    saved = c.state_dict()
    d = SimClock(net, Deadline.parse("1.3x"))
    d.load_state_dict(saved)
    d.prepare(torch.device("cpu"), 5, W)
    for i in range(3, 6):
        d.tick(N, NBYTES, PACKET)
        assert torch.equal(d.lost, masks[i])
    assert d.read() == a.read()


def test_the_state_carries_the_clock_through_its_checkpoint_and_config():
    net = NetworkModel(bandwidth_gbps=40, jitter="lognormal 3 1")
    state = LossyState(loss_model="deadline 1.5x", network=net)
    assert state.config()["network"]["bandwidth_gbps"] == 40 and state.clock is not None
    with pytest.raises(ValueError, match="settings differ"):
        LossyState(loss_model="deadline 1.5x", network=NetworkModel()).load_state_dict(state.state_dict())
    plain = LossyState(loss_rate=0.1)
    assert "network" not in plain.config() and plain.clock is None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: NetworkModel(bandwidth_gbps=-1), "bandwidth_gbps must be > 0"),
        (lambda: NetworkModel(latency_us=-1), "latency_us must be >= 0"),
        (lambda: NetworkModel(straggler_prob=1.5), "straggler_prob must be in [0, 1]"),
        (lambda: NetworkModel(straggler_factor=0.5), "straggler_factor must be >= 1"),
        (lambda: NetworkModel(drop_rate=1.0), "drop_rate must be in [0, 1)"),
        (lambda: NetworkModel(rto_us=0), "rto_us must be > 0"),
        (lambda: NetworkModel(jitter="gauss 1 2"), "jitter must be 'none'"),
        (lambda: NetworkModel(jitter="lognormal 1"), "takes 2 numbers"),
        (lambda: NetworkModel(jitter="pareto 0 2"), "XM > 0"),
        (lambda: Deadline.parse("0x"), "deadline must be > 0"),
        (lambda: Deadline.parse("-5us"), "deadline must be > 0"),
        (lambda: Deadline.parse("soon"), "deadline must be a multiple"),
        (lambda: LossyState(loss_model="deadline 2x"), "needs network=NetworkModel"),
        (
            lambda: LossyState(loss_model="deadline 2x", network=NetworkModel(), drop_point="both"),
            "not 'both'",
        ),
        (
            lambda: LossyState(loss_model="deadline 2x", network=NetworkModel(), retransmit=1),
            "does not resend",
        ),
        (
            lambda: LossyState(loss_model="deadline 2x", network=NetworkModel(), packetization="tensor"),
            "needs packetization='mtu'",
        ),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


# ------------------------------------------------------------------ inside DDP (W = 3)


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    from ..launch import launch

    worker = Path(__file__).with_name("clock_worker.py")
    return launch(worker, 3, ["deadline"], tmp_path_factory.mktemp("clock") / "results.json")


def test_deadline_loss_in_ddp_matches_the_cdf_and_the_clock_is_one(ddp_ranks):
    world, steps, packets = 3, 60, 200
    res = [r["deadline"] for r in ddp_ranks]
    # rank r sends 2^r: the sum's bits say whose copies of each packet arrived
    v = np.array(res[0]["zero"]["values"]).astype(int)  # the same result on every rank
    for r in res[1:]:
        assert np.array_equal(np.array(r["zero"]["values"]).astype(int), v)
    arrived = (v[..., None] >> np.arange(world)) & 1
    lost = int((1 - arrived).sum())
    assert lost == res[0]["zero"]["lost"] and res[0]["zero"]["sent"] == world * steps * packets
    assert inside(lost, world * steps * packets, 1 - res[0]["keep"])  # the closed form
    assert all(r["clock"] == res[0]["clock"] for r in res)  # one clock on every rank
    assert res[0]["clock"]["calls"] == steps and res[0]["clock"]["sim_comm_s"] > 0
    # rescale with regenerated counts: the peers' masks are the clock's other rows, so the
    # result is the mean of the copies that arrived (the same clock seed: the same losses)
    rescaled = np.array(res[0]["rescale"]["values"])
    expected = np.where(
        arrived.sum(-1) > 0, (arrived * 2.0 ** np.arange(world)).sum(-1) / np.maximum(arrived.sum(-1), 1), 0
    )
    np.testing.assert_allclose(rescaled, expected, rtol=1e-6)
    assert res[0]["rescale"]["clock"] == res[0]["clock"]


def test_deadline_post_rescale_prices_the_bucket_s_real_bytes(ddp_ranks):
    """A bucket of 20,050 fp32 elements in 201 packets of mtu 400 (the last 200 bytes):
    received packets are the lossless sum divided by 1 - p(d, B) with B = 80,200 bytes, the
    size the clock prices (not 201 x 400 = 80,400), and p is the lost fraction."""
    world, steps, packets, nbytes = 3, 60, 201, 4 * 20_050
    net = NetworkModel(bandwidth_gbps=10, latency_us=5, jitter="lognormal 4 1")
    t0 = net.ring_seconds(nbytes, world)
    p = net.deadline_loss_probability(1.2 * t0, t0, world)
    t0_mtu = net.ring_seconds(400 * packets, world)
    wrong = net.deadline_loss_probability(1.2 * t0_mtu, t0_mtu, world)
    assert abs(p - wrong) > 1e-4  # the premise: the two byte counts give different factors
    for r in ddp_ranks:
        short = r["deadline"]["short"]
        v = np.array(short["values"])
        assert v.shape == (steps, packets) and short["sent"] == steps * packets
        received = v != 0
        assert int((~received).sum()) == short["lost"]
        assert inside(short["lost"], steps * packets, p)
        np.testing.assert_allclose(v[received], (2**world - 1) / (1 - p), rtol=1e-6)


# ------------------------------------------------------------------ the study script


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--loss_model", "deadline 1.5x"], "the deadline loss model needs network=NetworkModel"),
        (["--jitter", "lognormal 3 1"], "--jitter: the simulated network needs --bandwidth_gbps"),
        (["--bandwidth_gbps", "-1"], "--bandwidth_gbps must be > 0"),
        (["--bandwidth_gbps", "10", "--net_drop_rate", "1"], "--net_drop_rate must be in [0, 1)"),
        (["--bandwidth_gbps", "10", "--jitter", "pareto 1"], "jitter 'pareto' takes 2 numbers"),
        (["--bandwidth_gbps", "10", "--straggler_factor", "0.5"], "--straggler_factor must be >= 1"),
        (["--bandwidth_gbps", "10", "--loss_model", "deadline 0x"], "deadline must be > 0"),
        (["--target_acc", "1.5"], "--target_acc must be in (0, 1]"),
        (["--bandwidth_gbps", "10", "--model", "gpt-tiny", "--strategy", "fsdp"], "not supported under FSDP"),
    ],
)
def test_bad_network_flags_exit_2_with_message(flags, message, capsys, tmp_path):
    import train_ddp

    with pytest.raises(SystemExit) as exc:
        train_ddp.main([*flags, "--output_dir", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


SIM = (
    "--dataset digits --model squeezenet1_1 --workers 0 --num_epochs 3 --batch_size 32 "
    "--accumulation_steps 1 --max_steps 60 --lab_round 1 --use_avg --worker_drop --mtu 1500 "
    "--loss_model deadline_1.2x "
    "--bandwidth_gbps 10 --jitter lognormal_4_1 --straggler_prob 0.1 --straggler_factor 2 "
    "--net_drop_rate 0.001 --target_acc 0.05"
)


def sim_argv(out: Path, extra: list[str] | None = None) -> list[str]:
    argv = [a.replace("_", " ") if a.startswith(("deadline", "lognormal")) else a for a in SIM.split()]
    return [*argv, *(extra or []), "--output_dir", str(out)]


def test_simulated_time_columns_summary_and_exact_resume(tmp_path):
    import subprocess

    from lossy_hooks.study.run_control import FAULT_ENV

    from ..study.study_batch import run_batch
    from ..study.test_train_ddp import env, only_dir, rows, torchrun

    cut, ref = tmp_path / "cut", tmp_path / "ref"
    env_cut = env() | {FAULT_ENV: "kill:after_metrics:2"}
    res = subprocess.run(torchrun(sim_argv(cut)), env=env_cut, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "Signal 9 (SIGKILL)" in res.stdout + res.stderr
    # the resume and the uninterrupted run: one group of 2 ranks for both (tests/study/study_batch.py)
    for res in run_batch([sim_argv(cut, ["--resume"]), sim_argv(ref)], 2, tmp_path / "batch"):
        assert res["code"] == 0, res["stdout"] + res["stderr"]
    run_dir = only_dir(ref)
    assert run_dir.name.endswith(
        "_deadline-1p2x_bucket25mb_net10g-5us-lognormal-4-1-strag0p1x2-drop0p001_ep3_bs32_r1_steps60"
    )
    drop = {"epoch_seconds", "images_per_s"}
    resumed, reference = (
        rows(only_dir(cut) / "round0" / "metrics.csv"),
        rows(run_dir / "round0" / "metrics.csv"),
    )
    assert [r["epoch"] for r in resumed] == ["1", "2", "3"]
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in reference
    ]  # the clock's stream and totals continue exactly
    steps_before = 0
    for r in reference:
        steps, steps_before = int(r["steps"]) - steps_before, int(r["steps"])
        lossfree, lossy, reliable = (float(r[k]) for k in ("sim_lossfree_s", "sim_comm_s", "sim_reliable_s"))
        assert 0 < lossfree <= lossy and lossfree <= reliable  # jitter only adds time
        assert lossy <= 1.2 * lossfree * (1 + 1e-5)  # never waits past 1.2 T_0 (CSV: 6 digits)
        assert float(r["sim_comm_per_step_s"]) == pytest.approx(lossy / steps, rel=1e-5)
        assert 0 < int(r["worker_packets_lost"]) < int(r["worker_packets_sent"])
    summary = rows(run_dir / "summary.csv")[0]
    first = reference[0]
    assert float(summary["sim_time_to_target_s"]) == pytest.approx(
        float(first["epoch_seconds"]) + float(first["sim_comm_s"]), rel=1e-5
    )  # 5% accuracy is reached in the first epoch; a deadline run is priced by its own clock
    total = sum(float(r["epoch_seconds"]) + float(r["sim_comm_s"]) for r in reference)
    assert float(summary["sim_time_s"]) == pytest.approx(total, rel=1e-5)
    # compare: the same time to target, and the accuracy-against-simulated-time figure
    from lossy_hooks.tools.compare import main as compare_main

    assert compare_main([str(ref), "--out", str(tmp_path / "cmp"), "--target_acc", "0.05"]) == 0
    (row,) = rows(tmp_path / "cmp" / "compare.csv")
    assert float(row["sim_seconds_to_target_mean"]) == pytest.approx(
        float(summary["sim_time_to_target_s"]), rel=1e-5
    )
    assert row["loss_rate"] == "nan"  # deadline loss has no single long-run rate
    assert (tmp_path / "cmp" / "accuracy_vs_sim_time.png").stat().st_size > 10_000

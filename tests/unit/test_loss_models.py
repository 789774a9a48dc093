"""Loss models on their own (one process): rates, bursts, exact counts, parsing, state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lossy_hooks import (
    Bernoulli,
    ExactCount,
    GilbertElliott,
    MarkovFourState,
    TailDrop,
    Trace,
    parse_loss_model,
)
from lossy_hooks.core.statistics import binomial_interval, burst_lengths, markov_loss_interval
from lossy_hooks.loss_models import MarkovLossModel


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw(model, total: int, chunk: int, seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    return torch.cat([model.sample(chunk, g) for _ in range(total // chunk)])


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5])
def test_bernoulli_count_in_binomial_interval(p):
    n = 200_000
    lost = int(draw(Bernoulli(p), n, 1000, seed=int(p * 100)).sum())
    lo, hi = binomial_interval(n, p, 0.999)
    assert lo <= lost <= hi, (lost, lo, hi)


def test_binomial_interval_is_right():
    lo, hi = binomial_interval(10_000, 0.1, 0.999)
    sd = math.sqrt(10_000 * 0.1 * 0.9)  # 30
    assert 1000 - 3.4 * sd < lo < 1000 - 3.1 * sd
    assert 1000 + 3.1 * sd < hi < 1000 + 3.5 * sd
    assert binomial_interval(10, 0.0) == (0, 0)
    assert binomial_interval(10, 1.0) == (10, 10)


def test_exact_count_exact_and_uniform():
    model, n, calls, p = ExactCount(0.3), 50, 3000, 0.3
    g = gen(1)
    masks = torch.stack([model.sample(n, g) for _ in range(calls)])
    assert (masks.sum(1) == 15).all()
    assert int(ExactCount(0.3).sample(10, g).sum()) == 3  # floor(0.3*10) despite 2.999..
    assert int(ExactCount(0.05).sample(19, g).sum()) == 0
    # every position is lost with marginal probability p (Bonferroni over 50 positions)
    lo, hi = binomial_interval(calls, p, 1 - 0.001 / n)
    per_position = masks.sum(0)
    assert ((per_position >= lo) & (per_position <= hi)).all(), per_position


def test_tail_drop_is_the_last_packets():
    g = gen()
    assert TailDrop(0.25).sample(10, g).tolist() == [False] * 7 + [True] * 3  # ceil(2.5)
    assert TailDrop(0.2).sample(10, g).tolist() == [False] * 8 + [True] * 2
    assert not TailDrop(0.0).sample(10, g).any()
    assert TailDrop(1.0).sample(4, g).all()


def test_trace_replays_cyclically_and_resumes(tmp_path):
    f = tmp_path / "loss.txt"
    f.write_text("# recorded\n1 0 0\n0,1\n")
    model = parse_loss_model(f"trace {f}")
    assert isinstance(model, Trace)
    g = gen()
    assert model.sample(4, g).tolist() == [True, False, False, False]
    saved = model.state_dict()
    cont = model.sample(6, g).tolist()
    assert cont == [True, True, False, False, False, True]
    fresh = Trace(f)
    fresh.load_state_dict(saved)
    assert fresh.sample(6, g).tolist() == cont
    assert model.long_run_loss_rate() == pytest.approx(0.4)
    with pytest.raises(ValueError, match="only 0/1"):
        bad = tmp_path / "bad.txt"
        bad.write_text("1 0 2")
        Trace(bad)


def test_gilbert_elliott_stationary_rate_and_burst_length():
    p, r = 0.05, 0.3
    model = GilbertElliott(p, r)
    lost = draw(model, 400_000, 10_000, seed=2)
    theory = p / (p + r)
    assert model.long_run_loss_rate() == pytest.approx(theory)
    assert float(lost.float().mean()) == pytest.approx(theory, rel=0.05)
    lo, hi = markov_loss_interval(model.transition_matrix, model.loss_probabilities, lost.numel())
    assert lo <= float(lost.float().mean()) <= hi
    bursts = burst_lengths(lost).double()
    assert float(bursts.mean()) == pytest.approx(1 / r, rel=0.05)
    # bursts are geometric: P(length = 1) = r
    assert float((bursts == 1).double().mean()) == pytest.approx(r, rel=0.05)


def test_gilbert_elliott_partial_loss_in_states():
    model = GilbertElliott(0.02, 0.2, loss_in_bad=0.7, loss_in_good=0.01)
    lost = draw(model, 400_000, 4096, seed=3)
    pi_bad = 0.02 / 0.22
    theory = pi_bad * 0.7 + (1 - pi_bad) * 0.01
    assert model.long_run_loss_rate() == pytest.approx(theory)
    lo, hi = markov_loss_interval(model.transition_matrix, model.loss_probabilities, lost.numel())
    assert lo <= float(lost.float().mean()) <= hi


def test_four_state_markov_matches_its_stationary_law():
    model = MarkovFourState(p13=0.03, p31=0.4, p32=0.2, p23=0.5, p14=0.01)
    lost = draw(model, 400_000, 5000, seed=4)
    t = model.transition_matrix
    np.testing.assert_allclose(t.sum(1), 1.0)
    lo, hi = markov_loss_interval(t, model.loss_probabilities, lost.numel())
    assert lo <= float(lost.float().mean()) <= hi
    # default p31 = 1 - p13: a simple Gilbert chain with loss rate p13
    simple = MarkovFourState(0.1)
    assert simple.long_run_loss_rate() == pytest.approx(0.1)
    assert float(draw(simple, 200_000, 1000).float().mean()) == pytest.approx(0.1, rel=0.05)


class _SixStates(MarkovLossModel):
    spec = "six-state test chain"


def _sequential_states(model: MarkovLossModel, u: torch.Tensor, state: int) -> list[int]:
    """The chain's defining recursion, one packet at a time: S_i = #{j : CDF[S_{i-1}, j] <= u_i}."""
    cdf = np.cumsum(model.transition_matrix, axis=1).astype(np.float32)
    cdf[:, -1] = np.inf
    out = []
    for ui in u.numpy():
        state = int(np.searchsorted(cdf[state], ui, side="right"))
        out.append(state)
    return out


@pytest.mark.parametrize(
    "model",
    [
        GilbertElliott(0.05, 0.3),
        GilbertElliott(1.0, 1.0),  # alternates every packet
        GilbertElliott(0.0, 1.0),  # never leaves Good
        MarkovFourState(0.03, 0.4, 0.2, 0.5, 0.01),
        MarkovFourState(0.1),
        _SixStates(np.random.default_rng(0).dirichlet([0.5] * 6, size=6), np.array([0, 1, 0, 1, 0, 1.0])),
    ],
    ids=["ge", "ge-alternating", "ge-stuck", "four-state", "four-state-default", "six-state-by-gather"],
)
def test_markov_scan_equals_the_sequential_recursion(model):
    """The blocked composition-table scan (and, for a chain whose maps generate more than
    1024 compositions, the gather scan) gives exactly the states of the packet-by-packet
    recursion with the same uniforms, across block edges (scan blocks of 16) and calls."""
    assert model._maps.closed == (model.transition_matrix.shape[0] <= 4)
    g, replay = gen(1), gen(1)
    state = 0
    for n in (1, 15, 16, 17, 33, 1000, 4097):
        lost = model.sample(n, g)
        states = _sequential_states(model, torch.rand(n, generator=replay), state)
        # netem: four-state decides with the state moved to, Gilbert-Elliott with the one arrived in
        deciding = [state, *states[:-1]] if model.loss_from_previous_state else states
        state = states[-1]
        assert lost.tolist() == [bool(model.loss_probabilities[s]) for s in deciding], n
        assert int(model.state_dict()["state"]) == state


def test_markov_state_carries_across_calls_and_state_dict():
    model = GilbertElliott(0.01, 0.05)
    g = gen(5)
    model.sample(1000, g)
    saved, gstate = model.state_dict(), g.get_state()
    expected = model.sample(500, g)
    copy = GilbertElliott(0.01, 0.05)
    copy.load_state_dict(saved)
    g2 = gen()
    g2.set_state(gstate)
    assert torch.equal(copy.sample(500, g2), expected)
    # long bursts continue over call boundaries: sampled in chunks of 10, bursts > 10 exist
    lost = draw(GilbertElliott(0.01, 0.05), 100_000, 10, seed=6)
    assert int(burst_lengths(lost).max()) > 40


def test_same_seed_same_drops():
    for model in (Bernoulli(0.1), ExactCount(0.1), GilbertElliott(0.05, 0.2), MarkovFourState(0.05)):
        a = draw(model.clone(), 5000, 500, seed=42)
        b = draw(model.clone(), 5000, 500, seed=42)
        c = draw(model.clone(), 5000, 500, seed=43)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_parse_loss_model_netem_syntax():
    ge = parse_loss_model("gemodel 1% 20% 100% 0%")
    assert isinstance(ge, GilbertElliott)
    assert (ge.p, ge.r, ge.loss_in_bad, ge.loss_in_good) == pytest.approx((0.01, 0.2, 1.0, 0.0))
    ge_default = parse_loss_model("loss gemodel 5%")
    assert (ge_default.r, ge_default.loss_in_bad, ge_default.loss_in_good) == pytest.approx((0.95, 1, 0))
    st = parse_loss_model("state 2% 30% 10%")
    assert isinstance(st, MarkovFourState)
    assert (st.p13, st.p31, st.p32, st.p23, st.p14) == pytest.approx((0.02, 0.3, 0.1, 1.0, 0.0))
    assert parse_loss_model("state 2%").p31 == pytest.approx(0.98)
    assert parse_loss_model("random 5%").p == pytest.approx(0.05)
    assert parse_loss_model("loss 5").p == pytest.approx(0.05)  # tc: plain numbers are percent
    assert isinstance(parse_loss_model("exact 10%"), ExactCount)
    assert isinstance(parse_loss_model("tail 10%"), TailDrop)
    for model in (ge, st, Bernoulli(0.125), ExactCount(0.1), TailDrop(0.3)):
        again = parse_loss_model(model.spec)
        assert type(again) is type(model) and again.spec == model.spec


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("random 150%", "between 0% and 100%"),
        ("random x", "percentage"),
        ("random 1% 25%", "not supported"),
        ("gemodel", "takes 1 to 4"),
        ("bogus 1%", "unknown loss model"),
        ("state 60% 50% 60%", "p31 \\+ p32"),
        ("trace /nonexistent/file", "does not exist"),
    ],
)
def test_parse_loss_model_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_loss_model(spec)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "x"])
def test_probabilities_checked(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Bernoulli(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        GilbertElliott(0.1, bad)


@pytest.mark.parametrize(
    "spec, expected",
    [
        # sch_netem.c loss_gilb_ell: the transition is drawn, then loss decided in the old state
        ("gemodel 100% 0%", [0, 1, 1, 1, 1, 1]),
        ("gemodel 100% 100%", [0, 1, 0, 1, 0, 1]),
        ("gemodel 0% 100%", [0, 0, 0, 0, 0, 0]),
        # loss_4state: moves, then loses in the new state (p13 = 100%, p31 = 100%: 3,1,3,1,...)
        ("state 100% 100%", [1, 0, 1, 0, 1, 0]),
        ("state 100% 0% 0%", [1, 1, 1, 1, 1, 1]),
    ],
)
def test_deterministic_chains_match_netem_sequences(spec, expected):
    model = parse_loss_model(spec)
    g = gen(0)
    first = model.sample(4, g).int().tolist()
    rest = model.sample(2, g).int().tolist()  # the state carries over between calls
    assert first + rest == expected


def _four_state_loss(p13, p31, p32=0.0, p23=1.0, p14=0.0):
    """Closed form from the balance equations: pi3 = p13/p31 pi1, pi2 = p32/p23 pi3,
    pi4 = p14 pi1; loss = pi3 + pi4."""
    pi3, pi4 = p13 / p31, p14
    pi2 = p32 / p23 * pi3 if p23 > 0 else 0.0
    return (pi3 + pi4) / (1 + pi2 + pi3 + pi4)


@pytest.mark.parametrize(
    "model, expected",
    [
        (MarkovFourState(0.03, 0.4, 0.2, 0.5, 0.01), _four_state_loss(0.03, 0.4, 0.2, 0.5, 0.01)),  # 0.0762
        (parse_loss_model("state 2% 30% 10%"), _four_state_loss(0.02, 0.3, 0.1)),  # iproute2: p23 = 1
        (parse_loss_model("state 2%"), 0.02),  # p31 = 1 - p13: Bernoulli-like, loss p13
        (MarkovFourState(1e-6, 1e-7, 1e-8, 1e-7, 1e-9), _four_state_loss(1e-6, 1e-7, 1e-8, 1e-7, 1e-9)),
        (MarkovFourState(0.4, 0.5, 0.45, 0.5, 0.3), _four_state_loss(0.4, 0.5, 0.45, 0.5, 0.3)),
        (GilbertElliott(0.01, 0.2), 0.01 / 0.21),
        (GilbertElliott(1e-7, 1e-6), 1e-7 / 1.1e-6),  # near-absorbing both ways
        (GilbertElliott(0.05, 0.3, 0.8, 0.02), 0.05 / 0.35 * 0.8 + 0.3 / 0.35 * 0.02),
        (GilbertElliott(1.0, 0.0), 1.0),  # absorbed in Bad
        (GilbertElliott(0.0, 0.3), 0.0),  # never leaves Good
        (GilbertElliott(1.0, 1.0), 0.5),  # periodic: the Cesaro mean
        (MarkovFourState(0.0), 0.0),
    ],
)
def test_long_run_loss_rate_matches_closed_forms(model, expected):
    rate = model.long_run_loss_rate()
    assert math.isfinite(rate)
    assert rate == pytest.approx(expected, rel=1e-9, abs=1e-15)
    pi = model.stationary_distribution()
    assert pi.sum() == pytest.approx(1.0) and (pi >= 0).all()
    if 0 < expected < 1:  # a stationary law: pi P = pi
        assert np.allclose(pi @ model.transition_matrix, pi, atol=1e-15)


@pytest.mark.parametrize("spec", ["state 3% 40% 20% 50% 1%", "gemodel 2% 30%", "gemodel 5% 40% 70% 1%"])
def test_long_run_rate_is_what_the_chain_loses(spec):
    """The stationary rate against 400k sampled packets: inside the 99.9% interval of the
    chain's batch means (batches of 4000 packets, far longer than its correlation time)."""
    model = parse_loss_model(spec)
    lost = draw(model, 400_000, 4000, seed=17).double()
    batches = lost.view(100, 4000).mean(1)
    mean, se = float(batches.mean()), float(batches.std() / 10)
    assert abs(mean - model.long_run_loss_rate()) < 3.3 * se, (mean, model.long_run_loss_rate(), se)


def test_keep_fraction_of_fixed_count_models():
    """ExactCount loses floor(p n), TailDrop ceil(p n) packets of n: the post rescale divides
    by the fraction kept, (n - m)/n; random models by 1 - p."""
    assert ExactCount(0.3).keep_fraction(7) == pytest.approx(5 / 7)
    assert TailDrop(0.3).keep_fraction(7) == pytest.approx(4 / 7)
    assert TailDrop(0.3).keep_fraction(1) == 0.0
    assert ExactCount(0.3).keep_fraction(10) == pytest.approx(0.7)
    assert Bernoulli(0.3).keep_fraction(7) == pytest.approx(0.7)
    assert GilbertElliott(0.01, 0.2).keep_fraction(7) == pytest.approx(1 - 0.01 / 0.21)
    for n in (1, 7, 10, 33):
        g = gen(n)
        assert int(ExactCount(0.3).sample(n, g).sum()) == n - round(ExactCount(0.3).keep_fraction(n) * n)
        assert int(TailDrop(0.3).sample(n, g).sum()) == n - round(TailDrop(0.3).keep_fraction(n) * n)


def test_trace_streams_start_at_their_own_offset():
    """Each stream (rank) replays the trace from offset seed mod L."""
    seq = [1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 1]
    a, b = Trace(seq), Trace(seq)
    a.start_stream(3)
    b.start_stream(3 + 11 * 5 + 4)  # offset 7
    g = gen(0)
    assert a.sample(11, g).int().tolist() == seq[3:] + seq[:3]
    assert b.sample(11, g).int().tolist() == seq[7:] + seq[:7]
    assert Trace(seq).sample(4, g).int().tolist() == seq[:4]  # outside the hook: from the start


def test_long_run_rate_weighs_closed_classes_by_absorption():
    """From a transient start, the chain ends in the lossless class {1} w.p. 0.2/0.8 and in
    the lossy class {2} w.p. 0.6/0.8: the long-run loss rate is 0.75."""
    model = _SixStates(
        np.array([[0.2, 0.2, 0.6], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), np.array([0.0, 0.0, 1.0])
    )
    assert model.long_run_loss_rate() == pytest.approx(0.75, rel=1e-12)
    assert model.stationary_distribution() == pytest.approx([0.0, 0.25, 0.75])

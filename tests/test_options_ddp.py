"""Encodings and protections inside real DDP (Gloo, W = 3, one launch): options_worker.py
runs the scenarios, these tests assert on their numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from .launch import launch

WORKER = Path(__file__).with_name("options_worker.py")
SCENARIOS = ["hadamard", "error_feedback", "wire_dtypes", "protect_and_recover"]
WORLD = 3


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch(WORKER, WORLD, SCENARIOS, tmp_path_factory.mktemp("options") / "results.json")


def test_hadamard_lossless_unbiased_and_spreads_bursts(ranks):
    for r in ranks:
        h = r["hadamard"]
        # loss 0: the lossless mean up to fp32 round-off of 2 x 14 butterfly stages
        assert h["lossless_rel_l2"] < 4 * 14 * 2**-24
        # rescale is unbiased with and without the encoding: averaging 150 steps of a fixed
        # gradient shrinks the error like 1/sqrt(150), no floor from a bias
        for enc in ("none", "hadamard"):
            u = h["unbiased"][enc]
            assert u["mean_rel_err"] < 3 * u["one_step_rel_err"] / math.sqrt(150)
        # Gilbert-Elliott bursts, the same losses (same seed, same packets): the worst
        # coordinate's error is far smaller once a lost packet is spread over its block
        b = h["burst"]
        assert b["none"]["lost"] == b["hadamard"]["lost"] > 0
        assert b["hadamard"]["worst_coordinate"] < 0.5 * b["none"]["worst_coordinate"]


def test_error_feedback_delivers_every_gradient_in_the_end(ranks):
    for r in ranks:
        ef = r["error_feedback"]
        assert ef["ef_rel_err"] < 1e-6  # arrived + residuals = sum of all gradients
        assert ef["without_rel_err"] > 0.05  # what arrived alone misses the lost part
        assert ef["residual_in_state"] == ef["residual_records"] >= 1  # residuals checkpointed


def test_wire_dtypes_three_ways_count_packets_and_bytes_on_the_wire(ranks):
    w = ranks[0]["wire_dtypes"]
    n = 3000  # elements in the bucket
    assert w["fp32"]["packets"] == math.ceil(n / 375) and w["fp32"]["bytes_sent"] == 4 * n
    for label in ("fp16", "bf16", "fp16_wrapper", "bf16_wrapper"):
        assert w[label]["packets"] == math.ceil(n / 750), label  # mtu 1500 // 2 bytes
        assert w[label]["bytes_sent"] == 2 * n, label
    assert w["fp32"]["max_rel_err"] < 1e-6
    assert w["fp16"]["max_rel_err"] < 2e-3 and w["bf16"]["max_rel_err"] < 2e-2
    assert w["fp16_wrapper"]["max_rel_err"] < 2e-3 and w["bf16_wrapper"]["max_rel_err"] < 2e-2


def test_protected_parameters_and_recovery_counters(ranks):
    for r in ranks:
        p = r["protect_and_recover"]
        assert p["protect"]["bias_max_err"] < 1e-6  # never lost at 50% loss
        assert p["protect"]["weight_lost_steps"] == 20
        st = p["protect"]["stats"]
        assert st["protected_packets"] == 20  # one packet a step carries the bias
        assert 0 <= st["recovered_protect"] <= 20
        # FEC (4, 1) + one retransmission; regenerate replays the peers through both
        fec = p["fec_stats"]
        assert p["fec_stats_regenerate"] == fec
        assert p["transports_zero_packets_same"] and p["transports_max_rel_diff"] < 1e-6
        # 13 packets a step -> 4 groups -> 4 parity packets, over 10 steps
        assert fec["packets_sent"] == 130 and fec["extra_packets"] >= 40
        assert abs(fec["extra_bytes"] - fec["extra_packets"] * 49200 / 130) <= 2  # rounded per bucket

"""The technique study tool on a tiny setting (2 Gloo ranks, squeezenet, one loss rate):
its files, and the figures that have closed forms (wire overhead of FEC and retransmission,
no overhead for fills, fidelity in range)."""

from __future__ import annotations

import csv
import math

from lossy_hooks.experiments.technique_study import TECHNIQUES, loss_spec, main
from lossy_hooks.loss_models import parse_loss_model


def test_gemodel_spec_has_the_requested_rate_and_burst():
    for rate, burst in ((0.01, 4), (0.3, 16)):
        model = parse_loss_model(loss_spec(rate, burst))
        assert math.isclose(model.long_run_loss_rate(), rate, rel_tol=1e-5)
        assert math.isclose(1 / model.r, burst, rel_tol=1e-6)  # mean burst: 1 / P(bad -> good)
    assert loss_spec(0.05, 0) == "random 5%"


def test_study_writes_rows_and_plot_with_closed_form_overheads(tmp_path, capsys):
    out = tmp_path / "study"
    flags = ["--out", str(out), "--model", "squeezenet1_1", "--rates", "0.1", "--models", "bernoulli"]
    assert main([*flags, "--rounds", "1", "--steps", "1", "--batch_size", "4"]) == 0
    rows = {r["technique"]: r for r in csv.DictReader(open(out / "techniques.csv"))}
    assert set(rows) == set(TECHNIQUES) and (out / "techniques.png").stat().st_size > 10_000
    for name in ("zero", "rescale", "error feedback", "protect norms+biases"):
        assert float(rows[name]["extra_bytes_frac"]) == 0.0, name
    assert abs(float(rows["fec (8,1)"]["extra_bytes_frac"]) - 1 / 8) < 0.01  # one parity per 8
    # resent packets ~ 10% of the packets (a binomial count over thousands of packets)
    assert 0.07 < float(rows["retransmit 1"]["extra_bytes_frac"]) < 0.13
    assert 0 <= float(rows["hadamard+rescale"]["extra_bytes_frac"]) < 0.01  # padding only
    for r in rows.values():
        assert 0.0 < float(r["cosine"]) <= 1.0 and float(r["rel_l2"]) > 0.0
    assert float(rows["retransmit 1"]["rel_l2"]) < float(rows["zero"]["rel_l2"])
    assert "wrote" in capsys.readouterr().out

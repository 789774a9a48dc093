"""The language-model study tool: its grid, its arithmetic (perplexity change paired by
seed), and a tiny real run (3 configurations: lossless DDP and FSDP, one lossy FSDP mode; run
by warm workers, not a launch each)."""

from __future__ import annotations

import csv
import math

import pytest

from lossy_hooks.experiments.lm_study import MODES, configurations, main, summarize


def test_grid_has_every_mode_at_every_rate_and_lossless_per_strategy():
    grid = configurations([0.01, 0.1])
    assert len(grid) == 2 + 2 * len(MODES) == 20
    assert [m for m, rate, _ in grid if rate == 0.0] == ["ddp lossless", "fsdp lossless"]
    flags = {(m, r): f for m, r, f in grid}
    assert flags["fsdp all-gather stale", 0.1][-2:] == ["--all_gather_loss_rate", "0.1"]
    assert flags["ddp post zero", 0.01] == [
        "--strategy", "ddp", "--drop_point", "post", "--fill", "zero", "--loss_rate", "0.01",
    ]  # fmt: skip


def test_relative_change_pairs_each_round_with_the_lossless_round_of_its_seed():
    records = [
        {"mode": "ddp lossless", "rate": 0.0, "rounds": [10.0, 20.0], "loss_measured": 0.0, "run_dir": "a"},
        {
            "mode": "ddp worker zero",
            "rate": 0.1,
            "rounds": [11.0, 21.0],
            "loss_measured": 0.1,
            "run_dir": "b",
        },
        {"mode": "fsdp lossless", "rate": 0.0, "rounds": [5.0], "loss_measured": 0.0, "run_dir": "c"},
        {"mode": "fsdp post zero", "rate": 0.1, "rounds": [6.0], "loss_measured": 0.1, "run_dir": "d"},
    ]
    rows = {r["mode"]: r for r in summarize(records)}
    assert rows["ddp worker zero"]["perplexity_mean"] == 16.0
    assert rows["ddp worker zero"]["perplexity_std"] == pytest.approx(math.sqrt(50))  # sample std
    assert rows["ddp worker zero"]["relative_change_mean"] == pytest.approx((0.1 + 0.05) / 2)
    assert rows["fsdp post zero"]["relative_change_mean"] == pytest.approx(0.2)  # its own baseline
    assert rows["ddp lossless"]["relative_change_mean"] == 0.0


def test_tiny_study_writes_its_table_and_figures(tmp_path, warm_launches):
    out = tmp_path / "runs"
    flags = ["--out", str(out), "--rates", "0.3", "--rounds", "1", "--epochs", "1", "--corpus_mb", "0.03"]
    assert main([*flags, "--batch_size", "8", "--only", "fsdp worker zero"]) == 0
    assert len(warm_launches.launches) == 3  # lossless DDP and FSDP, the lossy mode
    with open(out / "lm_study.csv", newline="") as fh:
        rows = {r["mode"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"ddp lossless", "fsdp lossless", "fsdp worker zero"}
    lossy = rows["fsdp worker zero"]
    assert abs(float(lossy["loss_measured"]) - 0.3) < 0.05
    assert float(rows["ddp lossless"]["loss_measured"]) == 0.0
    # lossless DDP and FSDP train the same model (to float round-off)
    assert float(rows["ddp lossless"]["perplexity_mean"]) == pytest.approx(
        float(rows["fsdp lossless"]["perplexity_mean"]), rel=1e-3
    )
    assert float(lossy["relative_change_mean"]) == pytest.approx(
        float(lossy["perplexity_mean"]) / float(rows["fsdp lossless"]["perplexity_mean"]) - 1, rel=1e-4
    )  # the CSV keeps 6 significant digits
    for name in ("perplexity_vs_loss.png", "relative_change.png"):
        assert (out / name).stat().st_size > 10_000


def test_bad_rates_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--rates", "1.5"])
    assert exc.value.code == 2 and "--rates must be in (0, 1)" in capsys.readouterr().err

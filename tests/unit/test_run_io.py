"""Run files and the figures derived from them, against numbers computed by hand from a
synthetic study (no training): summary.csv, compare's per-configuration aggregates."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from lossy_hooks.study.run_io import METRIC_FIELDS, MetricsLog, run_loss_rate, write_json, write_summary
from lossy_hooks.tools.compare import collect

CONFIG = {
    "dataset": "digits",
    "model": "resnet18",
    "world_size": 2,
    "drop_point": "worker",
    "post_sync": "shared",
    "fill": "rescale",
    "reduction": "mean",
    "packetization": "mtu",
    "mtu": 1500,
    "accumulation_steps": 1,
    "bucket_cap_mb": 25,
    "loss_model": "random 10%",
    "long_run_loss_rate": 0.1,
    "lab_round": 2,
}

# per round: (val_acc, epoch_seconds, worker sent, worker lost, status) per epoch
ROUNDS = [
    [(0.50, 10.0, 1000, 50, "ok"), (0.80, 12.0, 1000, 150, "ok"), (0.92, 11.0, 2000, 400, "ok")],
    [(0.60, 9.0, 1000, 100, "ok"), (0.95, 9.0, 1000, 100, "ok"), (math.nan, 9.0, 1000, 700, "diverged")],
]


def write_run(root: Path) -> Path:
    run_dir = root / "cfg_a"
    run_dir.mkdir(parents=True)
    write_json(run_dir / "config.json", CONFIG)
    for k, epochs in enumerate(ROUNDS):
        rd = run_dir / f"round{k}"
        rd.mkdir()
        log = MetricsLog(rd / "metrics.csv", METRIC_FIELDS)
        for e, (acc, secs, sent, lost, status) in enumerate(epochs):
            log.append(
                {
                    "epoch": e + 1,
                    "val_acc": acc,
                    "train_loss": 1.0,
                    "epoch_seconds": secs,
                    "worker_packets_sent": sent,
                    "worker_packets_lost": lost,
                    "effective_loss_rate": lost / sent,
                    "status": status,
                }
            )
        write_json(rd / "status.json", {"status": "diverged" if k == 1 else "finished"})
    return run_dir


def test_loss_rate_of_a_run_is_over_all_its_epochs(tmp_path):
    run_dir = write_run(tmp_path)
    rows = MetricsLog(run_dir / "round0" / "metrics.csv").rows()
    assert run_loss_rate(rows) == pytest.approx(600 / 4000)  # not the last epoch's 0.2
    write_summary(run_dir, 2)
    with open(run_dir / "summary.csv", newline="") as fh:
        summary = {r["round"]: r for r in csv.DictReader(fh)}
    assert float(summary["0"]["effective_loss_rate"]) == pytest.approx(0.15)
    assert float(summary["1"]["effective_loss_rate"]) == pytest.approx(900 / 3000)
    assert float(summary["mean"]["effective_loss_rate"]) == pytest.approx(0.225)
    assert float(summary["0"]["final_val_acc"]) == pytest.approx(0.92)
    assert float(summary["1"]["final_val_acc"]) == pytest.approx(0.95)  # last finite
    assert float(summary["1"]["best_val_acc"]) == pytest.approx(0.95)
    assert [summary[k]["status"] for k in ("0", "1")] == ["finished", "diverged"]


def test_compare_aggregates_by_hand(tmp_path):
    write_run(tmp_path)
    (rec,) = collect(tmp_path, target_acc=0.9)
    assert rec["final_mean"] == pytest.approx((0.92 + 0.95) / 2)
    assert rec["final_std"] == pytest.approx(math.sqrt(2) * 0.015)  # sample std of two values
    assert rec["best_mean"] == pytest.approx((0.92 + 0.95) / 2)
    assert rec["epochs_to_target_mean"] == pytest.approx((3 + 2) / 2)
    assert rec["seconds_to_target_mean"] == pytest.approx((33.0 + 18.0) / 2)
    assert rec["loss_rate_measured_mean"] == pytest.approx((0.15 + 0.3) / 2)
    assert rec["diverged_rounds"] == 1
    assert rec["rounds"] == 2
    assert json.dumps(rec["curves"][0]) == json.dumps([0.5, 0.8, 0.92])

"""What the time study's parts share (:mod:`lossy_hooks.experiments.time_study`,
:mod:`lossy_hooks.experiments.time_placement`): the simulated network and the training flags
of a time-to-accuracy configuration, and how a run's rows become simulated time (measured
compute per step + simulated communication)."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import numpy as np

from lossy_hooks.study.run_io import parse_float

__all__ = [
    "NETWORK",
    "STRAGGLERS",
    "compute_per_step",
    "round_rows",
    "simulated_times",
    "training_flags",
    "write_table",
]

# 1 Gbit/s links with 5 us latency, 1e-4 of the packets dropped, a 5 ms RTO
NETWORK = ["--bandwidth_gbps", "1", "--latency_us", "5", "--net_drop_rate", "0.0001", "--rto_us", "5000"]
# a rank is 3x slower at a collective with probability 5%, small jitter
STRAGGLERS = ["--jitter", "lognormal 6.2 0.5", "--straggler_prob", "0.05", "--straggler_factor", "3"]


def training_flags(args: argparse.Namespace, output_dir: Path) -> list[str]:
    """ResNet-18 on the packaged digits (SGD, batch 32 per rank, mtu 1500 B, ``--epochs``
    epochs, ``--rounds`` rounds, the target ``--target``) on :data:`NETWORK`, into ``output_dir``."""
    return [
        "--dataset", "digits", "--model", "resnet18", "--num_epochs", str(args.epochs), "--batch_size", "32",
        "--accumulation_steps", "1", "--learning_rate", "0.02", "--lab_round", str(args.rounds),
        "--mtu", "1500", "--use_avg", "--worker_drop", "--workers", "0", "--output_dir", str(output_dir),
        "--target_acc", format(args.target, "g"), *NETWORK,
    ]  # fmt: skip


def round_rows(run_dir: Path, k: int) -> list[dict[str, str]]:
    """Round ``k``'s metrics.csv rows (none when the round has no file)."""
    path = run_dir / f"round{k}" / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def compute_per_step(run_dir: Path, rounds: int) -> float:
    """The run's median measured seconds per step over its epochs and rounds (the compute
    every configuration of a setting is charged)."""
    per_step = [
        parse_float(x["epoch_seconds"]) / (int(x["steps"]) - int(prev["steps"]) if prev else int(x["steps"]))
        for k in range(rounds)
        for prev, x in zip([None, *round_rows(run_dir, k)], round_rows(run_dir, k), strict=False)
    ]
    return float(np.median(per_step))


def simulated_times(rows: list[dict[str, str]], compute: float, clock: str) -> np.ndarray:
    """Simulated seconds at each epoch's end: ``compute`` per step plus the ``clock`` column's
    communication, cumulated."""
    steps = np.diff([0] + [int(x["steps"]) for x in rows])
    return np.cumsum(compute * steps + np.array([parse_float(x[clock]) for x in rows]))


def write_table(path: Path, records: list[dict[str, Any]], fields: list[str]) -> None:
    """``records``' ``fields`` as a CSV (floats to 6 significant digits)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fields, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in fields})

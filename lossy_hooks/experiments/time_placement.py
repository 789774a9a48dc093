"""The time study's part ``placement`` (``python -m lossy_hooks.experiments.time_study --part
placement``, ``--nproc_placement`` ranks, 4 by default): which collective trains fastest under
loss. Per setting (:data:`PLACEMENT_SETTINGS`: two heavy-tailed ones around the ring's step
time and a straggler one) and algorithm (ps, ring, tree, direct): the reliable transport and
the fixed (1.5x) and adaptive (median rule) deadlines per hop, each with zero and rescale
fill, priced on the per-hop clock; the same measured compute per step for every
configuration of a setting. Writes ``placement_time_study.csv`` and
``placement_time_to_target.png``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from lossy_hooks.core.statistics import mean_std
from lossy_hooks.experiments.time_runs import (
    STRAGGLERS,
    compute_per_step,
    round_rows,
    simulated_times,
    training_flags,
    write_table,
)
from lossy_hooks.study.run_io import parse_float, run_loss_rate
from lossy_hooks.study.sweeping.launch import run_config

__all__ = [
    "PLACEMENT_ALGORITHMS",
    "PLACEMENT_SETTINGS",
    "PLACEMENT_TRANSPORTS",
    "part_placement",
    "placement_configurations",
    "plot_placement",
]

# Jitter around the ring's loss-free step (25 MiB over 4 ranks at 1 Gbit/s: ~52 ms): lognormal
# extra delays with a 50 ms median, so that a packet's latency on a ring hop, D + X, has
# p99/p50 of about 1.5 (sigma 0.30) or 3 (sigma 0.70); and stragglers (3x, 5% per rank and call).
PLACEMENT_SETTINGS: dict[str, list[str]] = {
    "tail p99/p50=1.5": ["--jitter", "lognormal 10.82 0.30"],
    "tail p99/p50=3": ["--jitter", "lognormal 10.82 0.70"],
    "stragglers": [*STRAGGLERS],
}
PLACEMENT_ALGORITHMS = ("ps", "ring", "tree", "direct")
PLACEMENT_TRANSPORTS = {
    "reliable": ["--loss_rate", "0"],
    "fixed": ["--loss_model", "deadline 1.5x"],
    "adaptive": ["--loss_model", "deadline adaptive"],
}


def placement_configurations(
    settings: list[str] | None = None,
    algorithms: list[str] | None = None,
    fills: list[str] | None = None,
    drop_point: str = "worker",
) -> list[tuple[str, str, str, str, list[str]]]:
    """``(setting, algorithm, transport, fill, flags)``: per setting and algorithm the reliable
    transport (nothing lost: fill ``-``) and the fixed and adaptive deadlines per fill.
    ``drop_point="worker"``: a per-hop deadline cuts the reduce phase and the broadcast runs
    reliably (waits, resends); ``"both"``: it cuts both phases, as OptiReduce bounds its whole
    collective (the adaptive deadline with rescale is then left out: rescale after the reduce
    needs a closed-form keep fraction, which the adaptive rule has not). ``ps`` keeps the worker
    drop point: its one-traversal price already bounds the whole collective."""
    out = []
    for setting in settings or list(PLACEMENT_SETTINGS):
        for algorithm in algorithms or list(PLACEMENT_ALGORITHMS):
            base = [*PLACEMENT_SETTINGS[setting], "--algorithm", algorithm]
            out.append((setting, algorithm, "reliable", "-", [*base, *PLACEMENT_TRANSPORTS["reliable"]]))
            both = drop_point == "both" and algorithm != "ps"
            for transport in ("fixed", "adaptive"):
                for fill in fills or ["zero", "rescale"]:
                    if both and transport == "adaptive" and fill == "rescale":
                        continue
                    flags = [*base, *PLACEMENT_TRANSPORTS[transport], "--fill", fill]
                    out.append(
                        (
                            setting,
                            algorithm,
                            transport,
                            fill,
                            [*flags, *(["--drop_point", "both"] if both else [])],
                        )
                    )
    return out


def _placement_record(
    run: tuple[str, str, str, str, Path], drop_point: str, compute: float, args: argparse.Namespace
) -> dict[str, Any]:
    """One configuration's row: time to the target and final accuracy over its rounds, the
    simulated communication per step (loss-free, its transport's, reliable), the loss."""
    setting, algorithm, transport, fill, run_dir = run
    clock = "sim_reliable_s" if transport == "reliable" else "sim_comm_s"
    rounds = [r for r in (round_rows(run_dir, k) for k in range(args.rounds)) if r]
    ttt, finals = [], []
    for r in rounds:
        times = simulated_times(r, compute, clock)
        accs = [parse_float(x["val_acc"]) for x in r]
        ttt.append(next((t for t, a in zip(times, accs, strict=True) if a >= args.target), math.nan))
        finals.append(accs[-1])
    total_steps = sum(int(r[-1]["steps"]) for r in rounds) or 1
    per_step = {c: sum(parse_float(x[c]) for r in rounds for x in r) / total_steps for c in
                ("sim_lossfree_s", "sim_comm_s", "sim_reliable_s")}  # fmt: skip
    m, sd = mean_std(ttt)
    acc_m, acc_s = mean_std(finals)
    return {
        "setting": setting,
        "algorithm": algorithm,
        "transport": transport,
        "fill": fill,
        "drop_point": drop_point,
        "rounds": len(rounds),
        "time_to_target_mean": m,
        "time_to_target_std": sd,
        "reached": sum(not math.isnan(t) for t in ttt),
        "final_acc_mean": acc_m,
        "final_acc_std": acc_s,
        "lossfree_per_step_s": per_step["sim_lossfree_s"],
        "comm_per_step_s": per_step[clock],
        "reliable_per_step_s": per_step["sim_reliable_s"],
        "compute_per_step_s": compute,
        "loss_measured": run_loss_rate([x for r in rounds for x in r]),  # both drop points
        "run_dir": run_dir.name,
    }


def part_placement(args: argparse.Namespace, figures: Path) -> None:
    """Time to accuracy per algorithm x transport x fill (the module docs)."""
    base = training_flags(args, args.out / "placement")
    configs = placement_configurations(
        args.settings_placement, args.algorithms, args.fills_placement, args.drop_point_placement
    )
    runs = [
        (setting, algorithm, transport, fill, run_config([*base, *flags], args.nproc_placement))
        for setting, algorithm, transport, fill, flags in configs
    ]
    drop_points = ["both" if "--drop_point" in flags else "worker" for *_, flags in configs]
    compute: dict[str, float] = {}  # per setting: the reliable runs' median seconds per step
    for setting, _, transport, _, run_dir in runs:
        if transport == "reliable":
            compute.setdefault(setting, compute_per_step(run_dir, args.rounds))
    records = [
        _placement_record(run, drop_point, compute[run[0]], args)
        for run, drop_point in zip(runs, drop_points, strict=True)
    ]
    write_table(figures / "placement_time_study.csv", records, list(records[0]))
    plot_placement(records, args.target, figures / "placement_time_to_target.png")


def plot_placement(records: list[dict[str, Any]], target: float, path: Path) -> None:
    """Per setting: simulated seconds to the target (mean ± std over rounds) per algorithm,
    one bar per transport and fill."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in records))
    algorithms = list(dict.fromkeys(r["algorithm"] for r in records))
    kinds = list(dict.fromkeys((r["transport"], r["fill"]) for r in records))
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.5), sharey=True, squeeze=False)
    width = 0.8 / len(kinds)
    for ax, setting in zip(axes[0], settings, strict=True):
        for i, (transport, fill) in enumerate(kinds):
            pts = [
                next((r for r in records if (r["setting"], r["algorithm"], r["transport"], r["fill"])
                      == (setting, a, transport, fill)), None)
                for a in algorithms
            ]  # fmt: skip
            ax.bar(
                [j + i * width for j in range(len(algorithms))],
                [p["time_to_target_mean"] if p else math.nan for p in pts],
                width,
                yerr=[p["time_to_target_std"] if p else 0 for p in pts],
                label=transport if fill == "-" else f"{transport}, {fill}",
                color=f"C{i}",
                capsize=2,
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(algorithms))], algorithms)
        ax.set(title=setting)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel(f"simulated s to {100 * target:.0f}% val acc (unreached: no bar)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

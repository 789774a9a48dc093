"""Is a lossy transport faster to a target accuracy? Time-to-accuracy on the simulated clock.

    python -m lossy_hooks.experiments.time_study --out runs/time_study --figures docs/results/time  # ~30 min
    python -m lossy_hooks.experiments.time_study --part buckets                                     # ~5 min
    python -m lossy_hooks.experiments.time_study --part placement --settings_placement stragglers   # W = 4

Part ``accuracy``: ResNet-18 on the packaged digits (2 Gloo ranks, SGD, batch 32 per rank,
mtu 1500 B, 25 MiB buckets, ``--epochs`` epochs, ``--rounds`` rounds) on a simulated network
of 1 Gbit/s links with 5 us latency, 1e-4 of the packets dropped and a 5 ms RTO, in two
settings: ``heavy-tailed`` (lognormal per-packet delays, median 2 ms, sigma 1) and
``stragglers`` (a rank is 3x slower at a collective with probability 5%, small jitter). Per
setting: the reliable transport (no loss; every collective waits for its last packet and
resends the dropped ones) and the deadline transport at several deadlines (multiples of the
loss-free ring time) with zero fill, rescale, and Hadamard + rescale. Simulated time =
compute + the simulated communication of the run's transport, where compute is the same for
every configuration of a setting: the reliable run's median measured seconds per step on
this machine (so the comparison is about the network; the CPU cost of the Hadamard transform
here, docs/performance.md, is left out, and runs sharing the CPU do not skew each other).

Part ``buckets``: the bucket-size question. At ``--bucket_cap_mb`` 1, 5, 25 and 100, a few
steps of the same model per loss process: the deadline transport (1.1x) under the two
settings above and under Pareto delays, and TailDrop and Gilbert-Elliott losses (not timing
models: the clock prices their collectives, the model decides their losses); per
configuration the simulated communication per step (deadline and reliable transports) and
the packets lost.

Part ``placement`` (``--nproc_placement`` ranks, 4 by default): which collective trains
fastest under loss, per algorithm, transport and fill on the per-hop clock
(:mod:`lossy_hooks.experiments.time_placement`). ``--drop_point_placement both``: a per-hop
deadline cuts both phases (default ``worker``: the reduce phase; the broadcast runs reliably).
Writes ``placement_time_study.csv`` and ``placement_time_to_target.png``.

Writes ``time_study.csv``, ``time_to_accuracy.png``, ``time_to_target_vs_deadline.png``,
``bucket_study.csv`` and ``bucket_size.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lossy_hooks.core.statistics import mean_std
from lossy_hooks.experiments.time_placement import (
    PLACEMENT_ALGORITHMS,
    PLACEMENT_SETTINGS,
    part_placement,
)
from lossy_hooks.experiments.time_runs import (
    NETWORK,
    STRAGGLERS,
    compute_per_step,
    round_rows,
    simulated_times,
    training_flags,
    write_table,
)
from lossy_hooks.study.run_io import parse_float
from lossy_hooks.study.sweeping.launch import run_config

__all__ = [
    "BUCKET_LOSSES",
    "FILLS",
    "SETTINGS",
    "accuracy_configurations",
    "bucket_configurations",
    "main",
]

SETTINGS: dict[str, list[str]] = {
    "heavy-tailed": ["--jitter", "lognormal 7.6 1"],
    "stragglers": [*STRAGGLERS],
}
FILLS = {
    "zero": ["--fill", "zero"],
    "rescale": ["--fill", "rescale"],
    "hadamard+rescale": ["--fill", "rescale", "--encoding", "hadamard"],
}
BUCKET_LOSSES = {
    "deadline, heavy-tailed": ["--loss_model", "deadline 1.1x", *SETTINGS["heavy-tailed"]],
    "deadline, stragglers": ["--loss_model", "deadline 1.1x", *SETTINGS["stragglers"]],
    "deadline, pareto": ["--loss_model", "deadline 1.1x", "--jitter", "pareto 2000 2"],
    "taildrop 1%": ["--loss_model", "tail 1%", *SETTINGS["heavy-tailed"]],
    "gemodel 1%, bursts of 16": ["--loss_model", "gemodel 0.0631% 6.25%", *SETTINGS["heavy-tailed"]],
}


def accuracy_configurations(
    deadlines: list[float], settings: list[str] | None = None, fills: list[str] | None = None
) -> list[tuple[str, str, float, list[str]]]:
    """``(setting, transport, deadline multiple or 0 for reliable, flags)``."""
    out = []
    for setting in settings or list(SETTINGS):
        net = SETTINGS[setting]
        out.append((setting, "reliable", 0.0, [*net, "--loss_rate", "0"]))
        for d in deadlines:
            for fill in fills or list(FILLS):
                out.append((setting, fill, d, [*net, "--loss_model", f"deadline {d:g}x", *FILLS[fill]]))
    return out


def bucket_configurations(
    sizes: list[float], losses: list[str] | None = None
) -> list[tuple[str, float, list[str]]]:
    """``(loss process, bucket_cap_mb, flags)``."""
    return [
        (loss, mb, [*BUCKET_LOSSES[loss], "--bucket_cap_mb", format(mb, "g")])
        for loss in losses or list(BUCKET_LOSSES)
        for mb in sizes
    ]


def _accuracy_record(
    setting: str, transport: str, d: float, run_dir: Path, compute: float, args: argparse.Namespace
) -> dict[str, Any]:
    """One configuration's row: time to the target and final accuracy over its rounds (with
    each round's curve), the communication per step, the loss measured."""
    clock = "sim_reliable_s" if transport == "reliable" else "sim_comm_s"
    rounds = [r for r in (round_rows(run_dir, k) for k in range(args.rounds)) if r]
    curves = []
    for r in rounds:
        times = simulated_times(r, compute, clock)
        curves.append((times.tolist(), [parse_float(x["val_acc"]) for x in r]))
    ttt = [next((t for t, a in zip(*c, strict=True) if a >= args.target), math.nan) for c in curves]
    sent = sum(parse_float(x["worker_packets_sent"]) for r in rounds for x in r)
    lost = sum(parse_float(x["worker_packets_lost"]) for r in rounds for x in r)
    comm = [sum(parse_float(x[clock]) for x in r) / max(int(r[-1]["steps"]), 1) for r in rounds]
    m, s = mean_std(ttt)
    acc_m, acc_s = mean_std([c[1][-1] for c in curves])
    return {
        "setting": setting,
        "transport": transport,
        "deadline": d,
        "rounds": len(rounds),
        "time_to_target_mean": m,
        "time_to_target_std": s,
        "reached": sum(not math.isnan(t) for t in ttt),
        "final_acc_mean": acc_m,
        "final_acc_std": acc_s,
        "comm_per_step_s": mean_std(comm)[0],
        "compute_per_step_s": compute,
        "loss_measured": lost / sent if sent else 0.0,
        "curves": curves,
        "run_dir": run_dir.name,
    }


def part_accuracy(args: argparse.Namespace, figures: Path) -> None:
    """Time to accuracy per setting, transport and fill (the module docs: part ``accuracy``)."""
    base = training_flags(args, args.out)
    runs = [
        (setting, transport, d, run_config([*base, *flags], args.nproc))
        for setting, transport, d, flags in accuracy_configurations(args.deadlines, args.settings, args.fills)
    ]
    compute: dict[str, float] = {}  # per setting: the reliable run's median seconds per step
    for setting, transport, _, run_dir in runs:
        if transport == "reliable":
            compute[setting] = compute_per_step(run_dir, args.rounds)
    records = [
        _accuracy_record(setting, transport, d, run_dir, compute[setting], args)
        for setting, transport, d, run_dir in runs
    ]
    write_table(figures / "time_study.csv", records, [k for k in records[0] if k != "curves"])
    plot_accuracy(records, args, figures)


def plot_accuracy(records: list[dict[str, Any]], args: argparse.Namespace, figures: Path) -> None:
    """``time_to_accuracy.png`` (accuracy against simulated time, reliable and deadline with
    rescale) and ``time_to_target_vs_deadline.png`` (seconds to the target per deadline and fill)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in records))
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 5), sharey=True, squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        chosen = [
            r
            for r in records
            if r["setting"] == setting and (r["transport"] == "reliable" or r["transport"] == "rescale")
        ]
        for i, r in enumerate(chosen):
            n = min(len(c[0]) for c in r["curves"])
            t = np.mean([c[0][:n] for c in r["curves"]], 0)
            a = np.mean([c[1][:n] for c in r["curves"]], 0)
            label = "reliable" if r["transport"] == "reliable" else f"deadline {r['deadline']:g}x, rescale"
            ax.plot(t, 100 * a, "o-" if r["transport"] == "reliable" else ".--", color=f"C{i}", label=label)
        ax.axhline(100 * args.target, color="k", ls=":", lw=1)
        ax.set(title=setting, xlabel="simulated time (s): measured compute + simulated communication")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation accuracy (%, mean over rounds)")
    fig.tight_layout()
    fig.savefig(figures / "time_to_accuracy.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 5), sharey=True, squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        rel = next(r for r in records if r["setting"] == setting and r["transport"] == "reliable")
        ax.axhspan(
            rel["time_to_target_mean"] - rel["time_to_target_std"],
            rel["time_to_target_mean"] + rel["time_to_target_std"],
            color="k", alpha=0.1,
        )  # fmt: skip
        ax.axhline(rel["time_to_target_mean"], color="k", label="reliable transport")
        for i, fill in enumerate(FILLS):
            pts = sorted(
                (r for r in records if r["setting"] == setting and r["transport"] == fill),
                key=lambda r: r["deadline"],
            )
            ax.errorbar(
                [r["deadline"] for r in pts], [r["time_to_target_mean"] for r in pts],
                [r["time_to_target_std"] for r in pts], fmt="o-", capsize=3, color=f"C{i}",
                label=f"deadline, {fill}",
            )  # fmt: skip
        ax.set(title=setting, xlabel="deadline (x the loss-free ring time)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"simulated seconds to {100 * args.target:.0f}% (mean ± std over rounds)")
    fig.tight_layout()
    fig.savefig(figures / "time_to_target_vs_deadline.png", dpi=110)
    plt.close(fig)


def _plot_buckets(records: list[dict[str, Any]], path: Path) -> None:
    """The bucket study's figure: simulated time per step and packets lost, per bucket cap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(13, 5))
    for i, loss in enumerate(dict.fromkeys(r["loss"] for r in records)):
        pts = sorted((r for r in records if r["loss"] == loss), key=lambda r: r["bucket_cap_mb"])
        x = [r["bucket_cap_mb"] for r in pts]
        if loss.startswith("deadline"):
            ax_t.plot(
                x,
                [1e3 * r["deadline_per_step_s"] for r in pts],
                "o-",
                color=f"C{i}",
                label=f"{loss}: deadline",
            )
            ax_t.plot(
                x,
                [1e3 * r["reliable_per_step_s"] for r in pts],
                "s:",
                color=f"C{i}",
                label=f"{loss}: reliable",
            )
        ax_l.plot(x, [100 * r["loss_rate"] for r in pts], "o-", color=f"C{i}", label=loss)
    lossfree = sorted(
        (r for r in records if r["loss"] == records[0]["loss"]), key=lambda r: r["bucket_cap_mb"]
    )
    ax_t.plot(
        [r["bucket_cap_mb"] for r in lossfree],
        [1e3 * r["lossfree_per_step_s"] for r in lossfree],
        "k--",
        label="loss-free alpha-beta",
    )
    ax_t.set(
        xscale="log",
        xlabel="bucket_cap_mb",
        ylabel="simulated communication per step (ms)",
        title="Time per step",
    )
    ax_l.set(
        xscale="log", xlabel="bucket_cap_mb", ylabel="packets lost (%)", title="Packets lost (deadline 1.1x)"
    )
    for ax in (ax_t, ax_l):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def part_buckets(args: argparse.Namespace, figures: Path) -> None:
    """Simulated communication per step and packets lost per bucket cap and loss process
    (the module docs: part ``buckets``)."""
    base = [
        "--dataset", "digits", "--model", "resnet18", "--num_epochs", "1",
        "--max_steps", str(args.bucket_steps), "--batch_size", "32", "--accumulation_steps", "1",
        "--lab_round", "1", "--mtu", "1500", "--use_avg", "--worker_drop", "--fill", "rescale",
        "--workers", "0", "--output_dir", str(args.out / "buckets"), *NETWORK,
    ]  # fmt: skip
    records = []
    for loss, mb, flags in bucket_configurations(args.bucket_sizes, args.bucket_losses):
        run_dir = run_config([*base, *flags], args.nproc)
        (row,) = round_rows(run_dir, 0)
        steps = int(row["steps"])
        sent, lost = parse_float(row["worker_packets_sent"]), parse_float(row["worker_packets_lost"])
        records.append(
            {
                "loss": loss,
                "bucket_cap_mb": mb,
                "steps": steps,
                "lossfree_per_step_s": parse_float(row["sim_lossfree_s"]) / steps,
                "deadline_per_step_s": parse_float(row["sim_comm_s"]) / steps,
                "reliable_per_step_s": parse_float(row["sim_reliable_s"]) / steps,
                "packets_sent": int(sent),
                "packets_lost": int(lost),
                "loss_rate": lost / sent if sent else 0.0,
                "run_dir": run_dir.name,
            }
        )
    write_table(figures / "bucket_study.csv", records, list(records[0]))
    _plot_buckets(records, figures / "bucket_size.png")


def main(argv: list[str] | None = None) -> int:
    """The flags checked, then the parts asked for (``--part``); returns 0."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("accuracy", "buckets", "both", "placement"), default="both")
    p.add_argument("--out", type=Path, default=Path("runs/time_study"), help="train_ddp.py --output_dir")
    p.add_argument("--figures", type=Path, default=None, help="where the CSVs and plots go (default --out)")
    p.add_argument(
        "--deadlines",
        type=float,
        nargs="+",
        default=[1.05, 1.1, 1.3],
        help="multiples of T_0 (> 0; at or below 1 every packet is late)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds per configuration (>= 1)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per round (>= 1)")
    p.add_argument("--target", type=float, default=0.9, help="target validation accuracy in (0, 1]")
    p.add_argument("--bucket_sizes", type=float, nargs="+", default=[1, 5, 25, 100], help="MiB")
    p.add_argument("--bucket_steps", type=int, default=10, help="steps per bucket-size configuration")
    p.add_argument("--nproc", type=int, default=2, help="ranks per launch (>= 2)")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=None, help="default: all")
    p.add_argument("--fills", nargs="+", choices=list(FILLS), default=None, help="default: all")
    p.add_argument(
        "--bucket_losses", nargs="+", choices=list(BUCKET_LOSSES), default=None, help="default: all"
    )
    p.add_argument("--nproc_placement", type=int, default=4, help="ranks of part placement (>= 2)")
    p.add_argument("--settings_placement", nargs="+", choices=list(PLACEMENT_SETTINGS), default=None)
    p.add_argument("--algorithms", nargs="+", choices=list(PLACEMENT_ALGORITHMS), default=None)
    p.add_argument("--fills_placement", nargs="+", choices=["zero", "rescale"], default=None)
    p.add_argument(
        "--drop_point_placement",
        choices=["worker", "both"],
        default="worker",
        help="phases a per-hop deadline cuts in part placement: the reduce (worker) or both",
    )
    args = p.parse_args(argv)
    if args.nproc_placement < 2:
        p.error(f"--nproc_placement must be >= 2, got {args.nproc_placement}")
    if not all(d > 0 for d in args.deadlines) or args.rounds < 1 or args.epochs < 1 or args.nproc < 2:
        p.error("--deadlines must be > 0, --rounds and --epochs >= 1, --nproc >= 2")
    if not (0 < args.target <= 1):
        p.error(f"--target must be in (0, 1], got {args.target}")
    figures = args.figures or args.out
    figures.mkdir(parents=True, exist_ok=True)
    if args.part in ("accuracy", "both"):
        part_accuracy(args, figures)
    if args.part in ("buckets", "both"):
        part_buckets(args, figures)
    if args.part == "placement":
        part_placement(args, figures)
    print(f"wrote {figures}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m lossy_hooks.experiments.placement_study --clock``: the time per collective of
every placement on the simulated clock per hop (:mod:`lossy_hooks.core.netclock`,
:mod:`lossy_hooks.core.placement.timing`), per algorithm, world size and transport
(reliable, a fixed and an adaptive deadline); the module docs of
:mod:`lossy_hooks.experiments.placement_study` say what each column measures. Writes
``placement_time.csv`` and ``placement_time.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Any

import torch

from lossy_hooks.core.netclock import SimClock
from lossy_hooks.core.network import NetworkModel
from lossy_hooks.core.placement import HopLoss, HopPlacement, LinkRules, placement_of
from lossy_hooks.loss_models import DeadlineLoss
from lossy_hooks.loss_models.deadline import AdaptiveDeadline, parse_deadline

__all__ = ["CPU", "TIME_FIELDS", "TRANSPORTS", "clock_study", "measure_time", "network_of", "plot_time"]

# the virtual ranks of the placement studies run in this process, on the CPU
CPU = torch.device("cpu")
TIME_FIELDS = [
    "algorithm",
    "world",
    "transport",
    "trials",
    "lossfree_s",
    "seconds",
    "reduce_s",
    "broadcast_s",
    "cut_fraction",
    "delivered",
    "received",
    "deadline_multiple",
]
TRANSPORTS = ("reliable", "fixed", "adaptive")


def measure_time(
    algorithm: str,
    world: int,
    network: NetworkModel,
    transport: str,
    deadline: str,
    packets: int,
    packet_bytes: float,
    trials: int,
    seed: int,
) -> dict[str, Any]:
    """One row of :data:`TIME_FIELDS`: the means over ``trials`` collectives of ``packets``
    packets on the clock (an adaptive deadline after its ``K`` warm-up collectives)."""
    placement = placement_of(algorithm)
    spec = parse_deadline(deadline) if transport != "reliable" else None
    clock = SimClock(network, spec, placement)
    clock.prepare(CPU, seed, world)
    hops = None
    if isinstance(placement, HopPlacement) and spec is not None:
        hops = HopLoss(placement, DeadlineLoss(spec), LinkRules(), ("reduce", "broadcast"))
        hops.prepare(CPU, seed, 0, world)
        hops.bind_clock(clock)
    nbytes = packets * packet_bytes
    warmup = spec.last if isinstance(spec, AdaptiveDeadline) else 0
    sums = dict.fromkeys(("cut_fraction", "delivered", "received", "deadline_multiple"), 0.0)
    for t in range(warmup + trials):
        if t == warmup:
            start = clock.read()
        clock.tick(packets, nbytes, packet_bytes)
        if t < warmup:
            continue
        x = clock.last_multiple
        sums["deadline_multiple"] += math.nan if x is None else float(x)
        if spec is None or world == 1:
            sums["delivered"] += 1.0
            sums["received"] += 1.0
            continue
        if hops is None:  # ps: one traversal (the worker uplinks)
            cut = float(clock.lost.double().mean())  # type: ignore[union-attr]
            sums |= {"cut_fraction": sums["cut_fraction"] + cut, "delivered": sums["delivered"] + 1 - cut}
            sums["received"] += 1.0
            continue
        slots = cut_slots = 0.0
        for phase, timing in clock.timing(packets, nbytes).items():
            slots += float(timing.valid.sum())
            cut_slots += float(clock.hop_late(phase, *timing.valid.shape).sum())
            alive, _ = hops.survival(phase, hops.draw(phase, packets, CPU), packets, CPU)
            sums["delivered" if phase == "reduce" else "received"] += float(
                hops.per_rank(alive, packets, CPU).double().mean()
            )
        sums["cut_fraction"] += cut_slots / max(slots, 1.0)
    end = clock.read()
    column = "sim_reliable" if spec is None else "sim_comm"
    row: dict[str, Any] = {"algorithm": algorithm, "world": world, "transport": transport, "trials": trials}
    row["lossfree_s"] = (end["sim_lossfree_s"] - start["sim_lossfree_s"]) / trials
    row["seconds"] = (end[f"{column}_s"] - start[f"{column}_s"]) / trials
    for phase in ("reduce", "broadcast"):
        key = f"{column}_{phase}_s"
        row[f"{phase}_s"] = (end[key] - start[key]) / trials if key in end else math.nan
    row |= {k: v / trials for k, v in sums.items()}
    return row


def plot_time(rows: list[dict[str, Any]], path: Path) -> None:
    """Seconds per collective and delivered fraction against ``W``: one colour per
    algorithm, one line style per transport, the loss-free time dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    styles = {"reliable": "-", "fixed": "--", "adaptive": ":"}
    colours: dict[str, Any] = {}
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        for transport in TRANSPORTS:
            sel = sorted(
                (r for r in rows if r["algorithm"] == algorithm and r["transport"] == transport),
                key=lambda r: r["world"],
            )
            if not sel:
                continue
            w = [r["world"] for r in sel]
            kw: dict[str, Any] = {"color": colours.get(algorithm), "ms": 3}
            (line,) = axes[0].plot(w, [r["seconds"] * 1e3 for r in sel], styles[transport] + "o", **kw)
            colours.setdefault(algorithm, line.get_color())
            label = f"{algorithm} {transport}"
            line.set_label(label)
            if transport != "reliable":
                axes[1].plot(
                    w, [r["delivered"] for r in sel], styles[transport] + "o", color=colours[algorithm], ms=3
                )
    axes[0].set_ylabel("simulated ms per collective")
    axes[1].set_ylabel("delivered fraction (deadline cuts, zero fill)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("world size W")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def network_of(args: argparse.Namespace) -> NetworkModel:
    """The simulated network of the ``--clock`` flags (a ``ValueError`` names a bad one)."""
    return NetworkModel(
        bandwidth_gbps=args.bandwidth_gbps,
        latency_us=args.latency_us,
        jitter=args.jitter,
        straggler_prob=args.straggler_prob,
        straggler_factor=args.straggler_factor,
        drop_rate=args.drop_rate,
        rto_us=args.rto_us,
    )


def clock_study(args: argparse.Namespace) -> int:
    """Every algorithm (ps first), world size and transport: :func:`measure_time` (one CSV
    row each, written as it comes) and the figure."""
    network = network_of(args)
    path = args.out / "placement_time.csv"
    rows = []
    packet_bytes = float(args.mtu)
    with open(path, "w", newline="", encoding="utf-8") as fh:  # one row at a time: a kill keeps them
        writer = csv.DictWriter(fh, TIME_FIELDS)
        writer.writeheader()
        for algorithm in dict.fromkeys(("ps", *args.algorithms)):  # ps first, once
            for world in args.worlds:
                for transport in TRANSPORTS:
                    deadline = args.adaptive if transport == "adaptive" else args.deadline
                    row = measure_time(
                        algorithm, world, network, transport, deadline, args.packets, packet_bytes,
                        args.trials, args.seed,
                    )  # fmt: skip
                    rows.append(row)
                    writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
                    fh.flush()
                    print(
                        f"{algorithm:>6} W={world:<5} {transport:>8} {row['seconds'] * 1e3:9.4f} ms "
                        f"(T0 {row['lossfree_s'] * 1e3:.4f}) cut {row['cut_fraction']:.4f} "
                        f"delivered {row['delivered']:.4f}",
                        flush=True,
                    )
    plot_time(rows, args.out / "placement_time.png")
    print(f"wrote {path} and {args.out / 'placement_time.png'}")
    return 0

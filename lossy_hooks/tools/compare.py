"""Compare the configurations of a study: tables and plots from every run folder.

    python -m lossy_hooks.tools.compare RUNS_DIR [--out DIR] [--target_acc 0.9] [--curves TEXT ...]

Reads every configuration folder under RUNS_DIR (those with a config.json) and writes to
``--out`` (default RUNS_DIR/compare):

- ``compare.csv``: one row per configuration: its settings, rounds, final and best
  validation accuracy (mean and std over rounds), epochs and seconds to the target
  accuracy, measured loss rate, diverged rounds;
- ``accuracy_vs_loss_rate.png``: final (and best) validation accuracy against the loss
  rate, one line per group of otherwise equal settings (e.g. drop point x fill), error bars
  = std over rounds; ``accuracy_vs_mtu.png`` and ``accuracy_vs_bucket_cap_mb.png`` the same
  against mtu and bucket size, where the study varies them;
- ``perplexity_vs_loss_rate.png``: for language models, final validation perplexity against
  the loss rate (``compare.csv``'s ``final_ppl_mean``, ``final_ppl_std`` and ``best_ppl_mean``,
  the mean over rounds of each round's lowest);
- ``time_to_target.png``: epochs to reach ``--target_acc`` against the loss rate;
- ``accuracy_vs_sim_time.png``: for runs with a simulated network (``--bandwidth_gbps``),
  validation accuracy against simulated time (measured epoch seconds plus the simulated
  communication: the deadline transport's for deadline loss, else the reliable one's), and
  ``sim_seconds_to_target_*`` in compare.csv;
- ``curves.png``: validation accuracy over epochs (mean over rounds) of the chosen
  configurations (``--curves``: substrings of folder names; default: all, at most 12).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from lossy_hooks.core.statistics import mean_std
from lossy_hooks.study.run_io import parse_float, read_json, run_loss_rate, sim_clock_column, time_to_target
from lossy_hooks.study.run_names import option_parts, workload_parts

__all__ = ["collect", "main", "write_outputs"]

GROUP_FIELDS = [
    "dataset",
    "model",
    "world_size",
    "drop_point",
    "post_sync",
    "fill",
    "reduction",
    "packetization",
    "mtu",
    "accumulation_steps",
    "bucket_cap_mb",
    "loss_family",
    "options",
]
X_AXES = {
    "loss_rate": "packet loss rate (%)",
    "mtu": "MTU (payload bytes per packet)",
    "bucket_cap_mb": "DDP bucket size (MiB)",
}


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def collect(runs_dir: Path, target_acc: float) -> list[dict[str, Any]]:
    """One record per configuration folder, with per-round curves and aggregates."""
    records = []
    for cfg_path in sorted(runs_dir.glob("*/config.json")):
        run_dir = cfg_path.parent
        cfg = read_json(cfg_path)
        rounds = []
        for k in range(int(cfg.get("lab_round", 1))):
            mpath = run_dir / f"round{k}" / "metrics.csv"
            if not mpath.exists():
                continue
            rows = _read_rows(mpath)
            acc = [parse_float(r["val_acc"]) for r in rows]
            seconds = np.cumsum([parse_float(r["epoch_seconds"]) for r in rows]) if rows else np.array([])
            reach = next((i for i, a in enumerate(acc) if a >= target_acc), None)
            finite = [a for a in acc if not math.isnan(a)]
            ppl = [x for x in (parse_float(r.get("val_perplexity")) for r in rows) if not math.isnan(x)]
            clock = sim_clock_column(cfg)
            sim = (
                np.cumsum([parse_float(r.get("epoch_seconds")) + parse_float(r.get(clock)) for r in rows])
                if clock and rows
                else np.array([])
            )
            rounds.append(
                {
                    "val_acc": acc,
                    "final": finite[-1] if finite else math.nan,
                    "best": max(finite) if finite else math.nan,
                    "final_ppl": ppl[-1] if ppl else math.nan,
                    "best_ppl": min(ppl) if ppl else math.nan,
                    "epochs_to_target": reach + 1 if reach is not None else math.nan,
                    "seconds_to_target": float(seconds[reach]) if reach is not None else math.nan,
                    "sim_seconds_to_target": time_to_target(rows, target_acc, clock) if clock else math.nan,
                    "sim_times": sim.tolist(),
                    "loss_rate_measured": run_loss_rate(rows),  # the whole round, every epoch
                    "diverged": any(r["status"] == "diverged" for r in rows),
                }
            )
        if not rounds:
            continue
        rec = {
            "name": run_dir.name,
            **{k: cfg.get(k) for k in GROUP_FIELDS if k not in ("loss_family", "options")},
            # encodings, protections, strategy, all-gather loss, optimizer, text budget
            "options": "+".join(option_parts(cfg) + workload_parts(cfg)) or "-",
            "loss_family": str(cfg.get("loss_model", "")).split()[0],
            "loss_model": cfg.get("loss_model"),
            # None: no single rate (deadline loss depends on the bucket): NaN here
            "loss_rate": parse_float(str(cfg.get("long_run_loss_rate", cfg.get("loss_rate", 0.0)))),
            "rounds": len(rounds),
            "curves": [r["val_acc"] for r in rounds],
            "sim_curves": [(r["sim_times"], r["val_acc"]) for r in rounds if r["sim_times"]],
            "diverged_rounds": sum(r["diverged"] for r in rounds),
        }
        if rec["drop_point"] == "worker":
            rec["post_sync"] = "-"
        for key in (
            "final",
            "best",
            "final_ppl",
            "best_ppl",
            "epochs_to_target",
            "seconds_to_target",
            "sim_seconds_to_target",
            "loss_rate_measured",
        ):
            rec[f"{key}_mean"], rec[f"{key}_std"] = mean_std([r[key] for r in rounds])
        records.append(rec)
    return records


def _groups(records: list[dict[str, Any]], x: str) -> tuple[dict[tuple, list[dict]], list[str]]:
    fields = [f for f in GROUP_FIELDS if f != x and not (x == "loss_rate" and f == "loss_family")]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[tuple(r[f] for f in fields)].append(r)
    varying = [f for i, f in enumerate(fields) if len({k[i] for k in groups}) > 1]
    return groups, varying


def _label(key: tuple, records: list[dict], varying: list[str]) -> str:
    r = records[0]
    return ", ".join(f"{r[f]}" if f in ("drop_point", "fill") else f"{f}={r[f]}" for f in varying) or "all"


def _save(fig: Any, ax: Any, out: Path, legend_size: int) -> None:
    """Grid, legend, layout, and the figure written to ``out`` and closed."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_against(records: list[dict[str, Any]], x: str, out: Path, metric: str = "final") -> bool:
    """Accuracy against ``x`` with error bars; False where the study has one value of ``x``."""
    if len({r[x] for r in records}) < 2:
        return False
    groups, varying = _groups(records, x)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    perplexity = metric.endswith("_ppl")
    scale = 1 if perplexity else 100
    for key, recs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        recs = sorted(recs, key=lambda r: r[x])
        xs = np.array([r[x] for r in recs], dtype=float) * (100 if x == "loss_rate" else 1)
        ys = np.array([r[f"{metric}_mean"] for r in recs]) * scale
        es = np.array([r[f"{metric}_std"] for r in recs]) * scale
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4, label=_label(key, recs, varying))
    what = "validation perplexity" if perplexity else "validation accuracy (%)"
    which = metric.split("_")[0]
    ax.set(
        xlabel=X_AXES[x],
        ylabel=f"{which} {what}",
        title=f"{which.capitalize()} {what.split(' (')[0]} vs {X_AXES[x].split(' (')[0]} "
        f"(mean ± std over rounds)",
    )
    _save(fig, ax, out, legend_size=8)
    return True


def plot_time_to_target(records: list[dict[str, Any]], target: float, out: Path) -> None:
    groups, varying = _groups(records, "loss_rate")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for key, recs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        recs = sorted(recs, key=lambda r: r["loss_rate"])
        xs = [100 * r["loss_rate"] for r in recs]
        ax.errorbar(
            xs,
            [r["epochs_to_target_mean"] for r in recs],
            yerr=[r["epochs_to_target_std"] for r in recs],
            marker="s",
            capsize=4,
            label=_label(key, recs, varying),
        )
    ax.set(
        xlabel=X_AXES["loss_rate"],
        ylabel="epochs",
        title=f"Epochs to reach {100 * target:.0f}% validation accuracy (missing = never reached)",
    )
    _save(fig, ax, out, legend_size=8)


def plot_curves(records: list[dict[str, Any]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for r in records:
        n = max(len(c) for c in r["curves"])
        grid = np.full((len(r["curves"]), n), np.nan)
        for i, c in enumerate(r["curves"]):
            grid[i, : len(c)] = c
        with np.errstate(all="ignore"):
            mean = np.nanmean(grid, 0) * 100
        ax.plot(np.arange(1, n + 1), mean, marker="o", label=r["name"], linewidth=1.2)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="Validation accuracy (mean over rounds)")
    _save(fig, ax, out, legend_size=6)


def plot_sim_time(records: list[dict[str, Any]], target: float, out: Path) -> None:
    """Validation accuracy against simulated time, every round of every configuration (one
    colour per configuration), the target as a line."""
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for i, r in enumerate(records):
        for j, (times, acc) in enumerate(r["sim_curves"]):
            label = f"{r['name'][-60:]} ({r['sim_seconds_to_target_mean']:.1f} s)" if j == 0 else None
            ax.plot(times, 100 * np.asarray(acc), marker=".", color=f"C{i % 10}", alpha=0.8, label=label)
    ax.axhline(100 * target, color="k", ls=":", lw=1)
    ax.set(
        xlabel="simulated time (s): measured epoch time on this machine + simulated communication",
        ylabel="validation accuracy (%)",
        title=f"Time to accuracy (legend: mean simulated seconds to {100 * target:.0f}%)",
    )
    _save(fig, ax, out, legend_size=6)


CSV_FIELDS = [
    "name",
    *GROUP_FIELDS,
    "loss_model",
    "loss_rate",
    "rounds",
    "final_mean",
    "final_std",
    "best_mean",
    "best_std",
    "final_ppl_mean",
    "final_ppl_std",
    "best_ppl_mean",
    "epochs_to_target_mean",
    "seconds_to_target_mean",
    "sim_seconds_to_target_mean",
    "sim_seconds_to_target_std",
    "loss_rate_measured_mean",
    "diverged_rounds",
]


def write_outputs(records: list[dict[str, Any]], out: Path, target: float, curves: list[str]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "compare.csv"]
    with open(out / "compare.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(records, key=lambda r: r["name"]):
            w.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in CSV_FIELDS}
            )
    # deadline loss has no single loss rate (NaN): left out of the plots against it
    rated = [r for r in records if not math.isnan(r["loss_rate"])]
    for x in X_AXES:
        path = out / f"accuracy_vs_{x}.png"
        if plot_against(rated if x == "loss_rate" else records, x, path):
            written.append(path)
    with_ppl = [r for r in rated if not math.isnan(r["final_ppl_mean"])]
    if with_ppl and plot_against(with_ppl, "loss_rate", out / "perplexity_vs_loss_rate.png", "final_ppl"):
        written.append(out / "perplexity_vs_loss_rate.png")
    if len({r["loss_rate"] for r in rated}) > 1:
        plot_time_to_target(rated, target, out / "time_to_target.png")
        written.append(out / "time_to_target.png")
    timed = [r for r in records if r["sim_curves"]]
    if timed:
        plot_sim_time(timed[:12], target, out / "accuracy_vs_sim_time.png")
        written.append(out / "accuracy_vs_sim_time.png")
    chosen = [r for r in records if not curves or any(c in r["name"] for c in curves)][:12]
    if chosen:
        plot_curves(chosen, out / "curves.png")
        written.append(out / "curves.png")
    return written


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(description="Compare the configurations of a packet-loss study.")
    p.add_argument("runs_dir", help="folder holding configuration folders (train_ddp.py --output_dir)")
    p.add_argument("--out", default=None, help="output folder (default RUNS_DIR/compare)")
    p.add_argument("--target_acc", type=float, default=0.9, help="target validation accuracy in (0, 1]")
    p.add_argument("--curves", nargs="*", default=[], help="substrings of folder names to plot over epochs")
    args = p.parse_args(argv)
    runs = Path(args.runs_dir)
    if not runs.is_dir():
        p.error(f"runs_dir {args.runs_dir!r} is not a folder")
    if not (0 < args.target_acc <= 1):
        p.error(f"--target_acc must be in (0, 1], got {args.target_acc}")
    records = collect(runs, args.target_acc)
    if not records:
        p.error(f"no configuration folders with metrics under {runs}")
    out = Path(args.out) if args.out else runs / "compare"
    written = write_outputs(records, out, args.target_acc, args.curves)
    table = Table(title=f"{len(records)} configurations in {runs}")
    for col in (
        "drop",
        "fill",
        "options",
        "loss",
        "rounds",
        "final acc",
        "best acc",
        f"epochs to {args.target_acc:.0%}",
        "lost",
    ):
        table.add_column(col, justify="right")
    language = any(not math.isnan(r["final_ppl_mean"]) for r in records)
    if language:
        table.add_column("final ppl", justify="right")
    for r in sorted(records, key=lambda r: (r["drop_point"], r["fill"], r["options"], r["loss_rate"])):
        table.add_row(
            r["drop_point"],
            r["fill"],
            r["options"],
            r["loss_model"],
            str(r["rounds"]),
            f"{100 * r['final_mean']:.2f} ± {100 * r['final_std']:.2f}",
            f"{100 * r['best_mean']:.2f} ± {100 * r['best_std']:.2f}",
            f"{r['epochs_to_target_mean']:.1f}",
            f"{100 * r['loss_rate_measured_mean']:.2f}%",
            *([f"{r['final_ppl_mean']:.3f} ± {r['final_ppl_std']:.3f}"] if language else []),
        )
    Console().print(table)
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

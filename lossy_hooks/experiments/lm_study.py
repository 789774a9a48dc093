"""How much perplexity does packet loss cost a language model, under DDP and under FSDP?

    python -m lossy_hooks.experiments.lm_study --out runs/lm_study --figures docs/results/lm   # the full grid
    python -m lossy_hooks.experiments.lm_study --rates 0.1 --rounds 1 --corpus_mb 0.1          # a quick look

Every configuration is one ``train_ddp.py`` launch (``--nproc`` Gloo ranks) of the same
workload: ``--model`` (gpt-tiny) on the standard library's sources (``--corpus_mb`` MiB),
AdamW, ``--epochs`` epochs, ``--rounds`` rounds (seeds 0, 1, ...), mean reduction. The grid:
loss 0 under DDP and FSDP; then for every loss rate, each strategy x drop point (worker =
a rank's contribution lost; post = packets of the reduced result lost, one mask for all
ranks) x fill (zero, rescale), and FSDP with the loss in the parameter all-gather alone
(stale fill). Finished configurations are not run again (each launch passes ``--resume``).

Writes ``lm_study.csv`` (one row per configuration: final validation perplexity mean and std
over rounds, relative change against the lossless run of the same strategy, measured loss),
``perplexity_vs_loss.png`` and ``relative_change.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lossy_hooks.core.statistics import mean_std
from lossy_hooks.experiments.lm_runs import final_perplexities, paired_change
from lossy_hooks.experiments.time_runs import write_table
from lossy_hooks.study.run_io import read_json
from lossy_hooks.study.sweeping.launch import run_config

__all__ = ["MODES", "configurations", "main", "summarize"]

# mode label -> flags (with the loss rate appended as --loss_rate or --all_gather_loss_rate)
MODES: dict[str, list[str]] = {
    f"{s} {p} {f}": ["--strategy", s, "--drop_point", p, "--fill", f]
    for s in ("ddp", "fsdp")
    for p in ("worker", "post")
    for f in ("zero", "rescale")
}
MODES["fsdp all-gather stale"] = ["--strategy", "fsdp", "--all_gather_fill", "stale"]


def configurations(rates: list[float]) -> list[tuple[str, float, list[str]]]:
    """``(mode, rate, flags)`` of the grid: loss 0 for each strategy, then every mode at
    every rate."""
    out = [(f"{s} lossless", 0.0, ["--strategy", s]) for s in ("ddp", "fsdp")]
    for rate in rates:
        for mode, flags in MODES.items():
            key = "--all_gather_loss_rate" if "all-gather" in mode else "--loss_rate"
            out.append((mode, rate, [*flags, key, format(rate, "g")]))
    return out


def _workload(args: argparse.Namespace) -> list[str]:
    return [
        "--model", args.model, "--optimizer", "adamw", "--learning_rate", format(args.lr, "g"),
        "--batch_size", str(args.batch_size), "--accumulation_steps", "1", "--use_avg",
        "--mtu", "1500", "--num_epochs", str(args.epochs), "--corpus_mb", format(args.corpus_mb, "g"),
        "--lab_round", str(args.rounds), "--workers", "0", "--output_dir", str(args.out),
    ]  # fmt: skip


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: final validation perplexity mean ± std over its rounds, and the
    change relative to the lossless run of the same strategy (``(ppl - ppl_0) / ppl_0``,
    mean over rounds of the per-seed ratio: each round is paired with the lossless round of
    its seed)."""
    lossless = {r["mode"].split()[0]: r["rounds"] for r in records if r["rate"] == 0.0}
    out = []
    for r in records:
        base = lossless.get(r["mode"].split()[0], [])
        m, s = mean_std(r["rounds"])
        rm, rs = paired_change(r["rounds"], base)
        out.append(
            {
                "mode": r["mode"],
                "loss_rate": r["rate"],
                "rounds": len(r["rounds"]),
                "perplexity_mean": m,
                "perplexity_std": s,
                "relative_change_mean": rm,
                "relative_change_std": rs,
                "loss_measured": r["loss_measured"],
                "run_dir": r["run_dir"],
            }
        )
    return out


def plot(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, strategy in zip(axes, ("ddp", "fsdp"), strict=True):
        base = next((r for r in rows if r["mode"] == f"{strategy} lossless"), None)
        for mode in [m for m in MODES if m.startswith(strategy)]:
            pts = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["loss_rate"])
            if base is not None:
                pts = [base, *pts]
            if not pts:
                continue
            x = [100 * r["loss_rate"] for r in pts]
            style = "--" if "zero" in mode else "-"
            ax.errorbar(
                x, [r["perplexity_mean"] for r in pts], [r["perplexity_std"] for r in pts],
                fmt="o" + style, capsize=3, label=mode.removeprefix(strategy + " "),
            )  # fmt: skip
        ax.set_title(strategy.upper())
        ax.set_xlabel("packet loss (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("final validation perplexity (mean ± std over rounds)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "perplexity_vs_loss.png", dpi=110)
    plt.close(fig)

    lossy = [r for r in rows if r["loss_rate"] > 0]
    rates = sorted({r["loss_rate"] for r in lossy})
    modes = [m for m in MODES if any(r["mode"] == m for r in lossy)]
    fig, ax = plt.subplots(figsize=(13, 5))
    width = 0.8 / max(len(modes), 1)
    for i, mode in enumerate(modes):
        pts = {r["loss_rate"]: r for r in lossy if r["mode"] == mode}
        xs = [j + i * width for j, rate in enumerate(rates) if rate in pts]
        ys = [100 * pts[rate]["relative_change_mean"] for rate in rates if rate in pts]
        es = [100 * pts[rate]["relative_change_std"] for rate in rates if rate in pts]
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=mode)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rates))], [f"{100 * r:g}%" for r in rates])
    ax.axhline(0.8, color="k", ls=":", lw=1, label="Weintraub et al. 2025: <= 0.8% at 10% loss")
    ax.set_ylabel("perplexity change vs lossless (%)")
    ax.set_xlabel("packet loss")
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "relative_change.png", dpi=110)
    plt.close(fig)


FIELDS = [
    "mode",
    "loss_rate",
    "rounds",
    "perplexity_mean",
    "perplexity_std",
    "relative_change_mean",
    "relative_change_std",
    "loss_measured",
    "run_dir",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/lm_study"), help="train_ddp.py --output_dir")
    p.add_argument("--figures", type=Path, default=None, help="where the CSV and plots go (default --out)")
    p.add_argument(
        "--rates", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.3], help="loss rates in (0, 1)"
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds per configuration (>= 1)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per round (>= 1)")
    p.add_argument("--corpus_mb", type=float, default=0.5, help="MiB of the standard library's text")
    p.add_argument("--model", default="gpt-tiny", help="a language model: gpt-* or moe-*")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per rank per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--nproc", type=int, default=2, help="ranks per launch (>= 2)")
    p.add_argument("--only", nargs="*", default=None, help="run only modes containing these words")
    args = p.parse_args(argv)
    if not all(0 < r < 1 for r in args.rates):
        p.error(f"--rates must be in (0, 1), got {args.rates}")
    if args.rounds < 1 or args.epochs < 1 or args.nproc < 2:
        p.error("--rounds and --epochs must be >= 1, --nproc >= 2")
    figures = args.figures or args.out
    figures.mkdir(parents=True, exist_ok=True)
    workload = _workload(args)
    records = []
    for mode, rate, flags in configurations(args.rates):
        if args.only and not any(w in mode for w in args.only) and rate > 0:
            continue
        argv_run = [*workload, *flags]
        run_dir = run_config(argv_run, args.nproc, f"{mode} at {100 * rate:g}%")
        ppl, measured = final_perplexities(run_dir, args.rounds)
        records.append({"mode": mode, "rate": rate, "rounds": ppl, "loss_measured": measured})
        records[-1]["run_dir"] = run_dir.name
    rows = summarize(records)
    write_table(figures / "lm_study.csv", rows, FIELDS)
    cfg = read_json(args.out / rows[0]["run_dir"] / "config.json") if rows else {}
    title = (
        f"{args.model} on {cfg.get('dataset', 'text')} ({args.corpus_mb:g} MiB), {args.nproc} ranks, "
        f"{args.epochs} epochs, {args.rounds} rounds"
    )
    plot(rows, figures, title)
    print(f"wrote {figures / 'lm_study.csv'} and its figures", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

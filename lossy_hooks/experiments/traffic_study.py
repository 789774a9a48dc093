"""Which traffic of a training step tolerates packet loss (issue 43)?

    python -m lossy_hooks.experiments.traffic_study --out runs/traffic_study --figures docs/results/traffic
    python -m lossy_hooks.experiments.traffic_study --dry_run         # the plan, its count, its cost
    python -m lossy_hooks.experiments.traffic_study --models gpt-tiny --types dp,tp --rates 0.1 --rounds 1
    python -m lossy_hooks.experiments.traffic_study --collect_only ...  # the table of what finished

Loss on one traffic type at a time, every other one lossless. Every configuration is one
``train_ddp.py`` launch (``--nproc`` Gloo ranks, 4 by default) of the same workload: a
language model (``--models``: gpt-tiny and moe-tiny) on the standard library's sources
(``--corpus_mb`` MiB), AdamW, 2 micro-batches per step, mtu 1500 B, mean reduction,
``--epochs`` epochs, ``--rounds`` rounds (seeds 0, 1, ...). The types (``--types``), each on
the layout that has it, with the fills its flags allow (``--fills`` selects among them):

    dp      data-parallel gradients (DDP, lost at the workers): zero, rescale
            (stale needs the drop point post: refused at the workers)
    gather  FSDP2's parameter all-gather: zero, stale (delivered, not summed: no rescale)
    tp      tensor-parallel activations and their gradients (--tp 2): zero, stale (rescale
            refused: the tp group loses all-gathers too)
    pp      pipeline activations and gradients (--pp 2): zero, stale
            (point-to-point is delivered, not summed: no rescale)
    ep      MoE dispatch and combine all-to-all (--ep 4; moe-* only): zero, stale

Each (model, layout) has one lossless run (rate 0): ddp, fsdp, tp2, pp2, ep4. Every
configuration's flags are checked by the study script's own parser before anything runs (a
refused one exits 2, naming it and the reason); a finished configuration is not run again
(its rounds all ended), an interrupted one resumes (``--resume``).

Writes ``traffic_study.csv`` (one row per model, type, fill and rate, the rate-0 rows the
layout's lossless run: final validation perplexity mean and std over rounds, its change
relative to that lossless run paired by seed, the type's measured loss rate from its own
packet counters), ``perplexity_vs_loss.png`` and ``relative_change.png`` (a panel per
model, a line per type, its style the fill).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lossy_hooks.core.statistics import mean_std
from lossy_hooks.experiments.lm_runs import final_perplexities, paired_change
from lossy_hooks.experiments.time_runs import write_table
from lossy_hooks.study.run_io import round_status
from lossy_hooks.study.sweeping.launch import run_config, run_dir_for
from lossy_hooks.study.workloads.gpt import GPT_CONFIGS

__all__ = ["FIELDS", "FILLS", "TRAFFIC", "Config", "Traffic", "configurations", "main", "summarize"]

FILLS = ("zero", "stale", "rescale")
# the dry run's seconds per launch: gpt-tiny's lossless DDP launch of the default workload (4
# ranks, 3 rounds of 2 epochs on 0.5 MiB) took 164 s on 2 shared CPU cores (docs/tools.md)
LAUNCH_SECONDS = 165.0


@dataclass(frozen=True)
class Traffic:
    """One traffic type: the layout that has it (its lossless run's name) and that layout's
    flags, the fills its flags allow, the metrics.csv counters that measure it
    (``<counters>_packets_sent`` / ``_lost``), its rate and fill flags, and which models
    have it (``all``, or ``moe``: an MoE model only)."""

    layout: str
    layout_flags: tuple[str, ...]
    fills: tuple[str, ...]
    counters: str
    rate_flag: str = "--traffic_loss"
    fill_flag: str = "--traffic_fill"
    models: str = "all"

    def has(self, model: str) -> bool:
        moe = GPT_CONFIGS[model].moe is not None
        return self.models == "all" or (self.models == "moe") == moe

    def loss_flags(self, name: str, rate: float, fill: str) -> list[str]:
        """The flags that lose ``rate`` of this traffic, filled by ``fill``."""
        value = format(rate, "g")
        if self.rate_flag == "--traffic_loss":
            value = f"{name}={value}"  # a fraction: tp=0.05
        return [self.rate_flag, value, self.fill_flag, fill]


DDP_WORKER = ("--strategy", "ddp", "--drop_point", "worker")
TRAFFIC = {
    "dp": Traffic("ddp", DDP_WORKER, ("zero", "rescale"), "worker", "--loss_rate", "--fill"),
    "gather": Traffic(
        "fsdp", ("--strategy", "fsdp"), ("zero", "stale"), "gather", "--all_gather_loss_rate",
        "--all_gather_fill",
    ),
    "tp": Traffic("tp2", ("--tp", "2"), ("zero", "stale"), "tp"),
    "pp": Traffic("pp2", ("--pp", "2"), ("zero", "stale"), "pp"),
    "ep": Traffic("ep4", ("--ep", "4"), ("zero", "stale"), "ep", models="moe"),
}  # fmt: skip


@dataclass(frozen=True)
class Config:
    """One launch: the model, the traffic type that loses, its fill (``""`` for the layout's
    lossless run, rate 0) and rate, and the study script's flags beyond the workload."""

    model: str
    traffic: str
    fill: str
    rate: float
    flags: tuple[str, ...]

    @property
    def layout(self) -> str:
        return TRAFFIC[self.traffic].layout

    @property
    def label(self) -> str:
        if not self.fill:
            return f"{self.model} {self.layout} lossless"
        return f"{self.model} {self.traffic} {self.fill} at {100 * self.rate:g}%"


def configurations(models: list[str], types: list[str], fills: list[str], rates: list[float]) -> list[Config]:
    """The grid: per model, per type it has (in :data:`TRAFFIC`'s order) with at least one of
    ``fills`` allowed, its layout's lossless run, then each allowed fill at each rate > 0."""
    lossy = sorted({r for r in rates if r > 0})
    out = []
    for model in models:
        for name in [t for t in TRAFFIC if t in types]:
            t = TRAFFIC[name]
            kept = [f for f in t.fills if f in fills]
            if not t.has(model) or not kept:
                continue
            out.append(Config(model, name, "", 0.0, t.layout_flags))
            out += [
                Config(model, name, f, r, (*t.layout_flags, *t.loss_flags(name, r, f)))
                for r in lossy
                for f in kept
            ]
    return out


def workload(args: argparse.Namespace, model: str) -> list[str]:
    """The study script's flags every configuration of ``model`` shares."""
    return [
        "--model", model, "--optimizer", "adamw", "--learning_rate", format(args.lr, "g"),
        "--batch_size", str(args.batch_size), "--accumulation_steps", "2", "--use_avg", "--mtu", "1500",
        "--num_epochs", str(args.epochs), "--corpus_mb", format(args.corpus_mb, "g"),
        "--lab_round", str(args.rounds), "--workers", "0", "--output_dir", str(args.out),
    ]  # fmt: skip


FIELDS = [
    "model",
    "type",
    "layout",
    "fill",
    "loss_rate",
    "rounds",
    "perplexity_mean",
    "perplexity_std",
    "relative_change_mean",
    "relative_change_std",
    "loss_measured",
    "run_dir",
]


def summarize(records: list[dict[str, Any]], fills: list[str]) -> list[dict[str, Any]]:
    """Rows of :data:`FIELDS` from ``records`` (``config``, its rounds' final perplexities
    ``rounds``, ``loss_measured``, ``run_dir``): per configuration the perplexity's mean and
    sample std over rounds and its change relative to the lossless run of the same model and
    layout, paired by seed (:func:`~lossy_hooks.experiments.lm_runs.paired_change`). A
    lossless run gives a row to each of its type's fills in ``fills`` (each line's rate 0),
    with a change of 0."""
    lossless = {(r["config"].model, r["config"].layout): r["rounds"] for r in records if not r["config"].fill}
    out = []
    for r in records:
        c = r["config"]
        m, s = mean_std(r["rounds"])
        rm, rs = paired_change(r["rounds"], lossless.get((c.model, c.layout), []))
        row = {"model": c.model, "type": c.traffic, "layout": c.layout, "loss_rate": c.rate}
        row |= {"rounds": len(r["rounds"]), "perplexity_mean": m, "perplexity_std": s}
        row |= {"relative_change_mean": rm, "relative_change_std": rs}
        row |= {"loss_measured": r["loss_measured"], "run_dir": r["run_dir"]}
        line_fills = [c.fill] if c.fill else [f for f in TRAFFIC[c.traffic].fills if f in fills]
        out += [row | {"fill": f} for f in line_fills]
    order = {m: i for i, m in enumerate(dict.fromkeys(r["model"] for r in out))}
    t, f = list(TRAFFIC), FILLS
    out.sort(key=lambda r: (order[r["model"]], t.index(r["type"]), f.index(r["fill"]), r["loss_rate"]))
    return out


def _panels(rows: list[dict[str, Any]], path: Path, key: str, ylabel: str, title: str) -> None:
    """One panel per model: ``key`` (× 100 for a relative change) against the loss rate, a
    line per type (its colour) and fill (its style), error bars the std over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    scale = 100.0 if key == "relative_change" else 1.0
    styles = {"zero": "--", "stale": ":", "rescale": "-"}
    for ax, model in zip(axes[0], models, strict=True):
        for i, name in enumerate(TRAFFIC):
            for fill in FILLS:
                pts = [r for r in rows if (r["model"], r["type"], r["fill"]) == (model, name, fill)]
                if not pts:
                    continue
                ax.errorbar(
                    [100 * r["loss_rate"] for r in pts],
                    [scale * r[f"{key}_mean"] for r in pts],
                    [scale * r[f"{key}_std"] for r in pts],
                    fmt="o" + styles[fill], color=f"C{i}", capsize=3, label=f"{name} {fill}",
                )  # fmt: skip
        if scale != 1.0:
            ax.axhline(0.0, color="k", lw=0.8)
        ax.set_title(model)
        ax.set_xlabel("packet loss of the one lossy type (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """``perplexity_vs_loss.png`` and ``relative_change.png`` in ``out``."""
    if not rows:
        return
    ylabel = "final validation perplexity (mean ± std over rounds)"
    _panels(rows, out / "perplexity_vs_loss.png", "perplexity", ylabel, title)
    ylabel = "perplexity change vs the lossless run of the layout (%)"
    _panels(rows, out / "relative_change.png", "relative_change", ylabel, title)


def _listed(p: argparse.ArgumentParser, flag: str, text: str, known: Any) -> list[str]:
    """The comma-separated names of ``flag``, each one of ``known`` (else exit 2 naming it)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        what = ", ".join(map(repr, unknown)) or "empty list"
        p.error(f"{flag}: unknown {what} (choose from {', '.join(known)})")
    return names


def _rates(p: argparse.ArgumentParser, text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"--rates: {text!r} is not a comma-separated list of numbers")
    if not rates or not all(0.0 <= r <= 1.0 for r in rates):
        p.error(f"--rates must be fractions in [0, 1], got {text!r}")
    return rates


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, checked (exit 2 naming the flag); lists parsed into ``models``, ``types``,
    ``fills``, ``rates``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/traffic_study"), help="train_ddp.py --output_dir")
    p.add_argument("--figures", type=Path, default=None, help="where the CSV and plots go (default --out)")
    p.add_argument("--models", default="gpt-tiny,moe-tiny", help="language models, comma-separated")
    p.add_argument("--types", default=",".join(TRAFFIC), help="traffic types, comma-separated")
    p.add_argument("--fills", default=",".join(FILLS), help="fills, comma-separated (per type: its own)")
    p.add_argument("--rates", default="0,0.01,0.05,0.1,0.2", help="loss rates in [0, 1] (0: lossless)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per configuration (--lab_round, >= 1)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per round (>= 1)")
    p.add_argument("--corpus_mb", type=float, default=0.5, help="MiB of the standard library's text (> 0)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per rank per micro-batch (>= 1)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (> 0)")
    p.add_argument("--nproc", type=int, default=4, help="Gloo ranks per launch (>= 2)")
    p.add_argument("--dry_run", action="store_true", help="print the plan, its count and cost; run nothing")
    p.add_argument(
        "--collect_only", action="store_true",
        help="launch nothing: the table and figures of the configurations that finished (a partial grid)",
    )  # fmt: skip
    p.add_argument(
        "--launch_seconds", type=float, default=LAUNCH_SECONDS,
        help="the dry run's seconds per launch (> 0; default: one gpt-tiny launch of the default workload)",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.models = _listed(p, "--models", args.models, GPT_CONFIGS)
    args.types = _listed(p, "--types", args.types, TRAFFIC)
    args.fills = _listed(p, "--fills", args.fills, FILLS)
    args.rates = _rates(p, args.rates)
    for flag, least in (("rounds", 1), ("epochs", 1), ("nproc", 2)):
        if getattr(args, flag) < least:
            p.error(f"--{flag} must be >= {least}, got {getattr(args, flag)}")
    for flag in ("corpus_mb", "batch_size", "lr", "launch_seconds"):
        if not getattr(args, flag) > 0:
            p.error(f"--{flag} must be > 0, got {getattr(args, flag)}")
    args.parser = p
    return args


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration with its study-script flags, its folder (``None`` when the study
    script refuses the flags, ``error`` its message) and whether it finished before."""
    out = []
    for c in configurations(args.models, args.types, args.fills, args.rates):
        argv = [*workload(args, c.model), *c.flags]
        run_dir, error = run_dir_for(argv, args.nproc)
        done = run_dir is not None and all(round_status(run_dir / f"round{k}") for k in range(args.rounds))
        out.append({"config": c, "argv": argv, "run_dir": run_dir, "error": error, "done": done})
    return out


def dry_run(planned: list[dict[str, Any]], launch_seconds: float) -> None:
    """Print the plan, its count and the compute it needs (launches to run x ``launch_seconds``)."""
    width = max((len(x["config"].label) for x in planned), default=0)
    for x in planned:
        where = f"refused: {x['error']}" if x["run_dir"] is None else x["run_dir"].name
        print(f"{x['config'].label:<{width}}  {'done  ' if x['done'] else ''}{where}")
    todo = sum(not x["done"] for x in planned)
    refused = sum(x["run_dir"] is None for x in planned)
    print(
        f"{len(planned)} configurations ({refused} refused by the study script, "
        f"{len(planned) - todo} done before); {todo} launches x {launch_seconds:g} s = "
        f"{todo * launch_seconds / 3600:.1f} h (--launch_seconds)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    planned = plan(args)
    if args.dry_run:
        dry_run(planned, args.launch_seconds)
        return 0
    refused = [f"{x['config'].label}: {x['error']}" for x in planned if x["run_dir"] is None]
    if refused and not args.collect_only:
        args.parser.error(
            f"{len(refused)} configurations refused by the study script (nothing run; choose others with "
            "--models / --types / --fills):\n  " + "\n  ".join(refused)
        )
    if not planned:
        args.parser.error("no configuration: no type of --types has a fill of --fills for --models")
    if args.collect_only:  # what finished (every round), lossless runs of the layouts included
        planned = [x for x in planned if x["done"]]
    records = []
    for x in planned:
        c, start, run_dir = x["config"], time.monotonic(), x["run_dir"]
        if x["done"]:
            print(f"{c.label}: done before, {run_dir.name}", flush=True)
        else:
            run_config(x["argv"], args.nproc, c.label)
            print(f"  {time.monotonic() - start:.0f} s", flush=True)
        ppl, measured = final_perplexities(run_dir, args.rounds, (TRAFFIC[c.traffic].counters,))
        records.append({"config": c, "rounds": ppl, "loss_measured": measured, "run_dir": run_dir.name})
    rows = summarize(records, args.fills)
    figures = args.figures or args.out
    figures.mkdir(parents=True, exist_ok=True)
    write_table(figures / "traffic_study.csv", rows, FIELDS)
    title = (
        f"packet loss on one traffic type at a time\n{args.nproc} Gloo ranks, {args.corpus_mb:g} MiB of "
        f"text, {args.epochs} epoch(s), {args.rounds} round(s)"
    )
    plot(rows, figures, title)
    print(f"wrote {figures / 'traffic_study.csv'} and its figures", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run a grid of train_ddp.py configurations: each a torchrun launch here, or a submitit job on
SLURM (``--executor slurm``) or on this machine (``--executor submitit-local``).

    python -m lossy_hooks.tools.sweep --nproc 2 --grid loss_rate=0,0.1,0.3 drop_point=worker,post \\
        fill=zero,rescale -- --dataset digits --model resnet18 --num_epochs 4 --lab_round 2
    python -m lossy_hooks.tools.sweep --config sweep.toml        # or .json
    python -m lossy_hooks.tools.sweep --executor slurm --nodes 2 --gpus_per_node 8 --partition gpu \\
        --time 4:00:00 --grid loss_rate=0,0.01,0.05 fill=zero,rescale -- --model resnet50 ...
    python -m lossy_hooks.tools.sweep --status runs/

A config file holds ``nproc``, ``fixed`` (flag -> value), ``grid`` (flag -> list of values) and
optionally ``cluster`` (``executor``, ``nodes``, ``gpus_per_node``, ``partition``, ``time``,
``account``, ``slurm_arg``: the flags of the same names, which win when given);
command-line ``--grid`` entries and flags after ``--`` are added to it. Boolean flags take
true/false. Every configuration is checked before anything runs: one with invalid flags is
reported and not run; one already finished (every round ended) is skipped without a launch or
a submission; one that a live process writes or a job holds is left alone; the others run
with ``--resume`` (which starts fresh where there is nothing to resume). A failing or
diverging configuration does not stop the sweep; the end summary lists each configuration's
outcome, and the exit code is 1 if any failed. ``--status`` reads the folders only
(:mod:`lossy_hooks.study.sweeping.config_state`).

This module is the command line (its flags, the config file, the status and result tables);
the sweep itself, which the experiments use too, is :mod:`lossy_hooks.study.sweeping`
(:func:`~lossy_hooks.study.sweeping.runner.run_sweep`; jobs:
:mod:`lossy_hooks.study.sweeping.jobs`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the tomli package (a dependency there)
    import tomli as tomllib

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lossy_hooks.study.extras import MissingExtraError, require
from lossy_hooks.study.sweeping.config_state import (
    JOB_RECORD,
    STATES,
    ConfigState,
    config_state,
    planned_configurations,
)
from lossy_hooks.study.sweeping.grid import parse_fixed, parse_value
from lossy_hooks.study.sweeping.jobs import (
    EXECUTORS,
    SUBMITIT_EXECUTORS,
    ClusterResources,
    parse_slurm_time,
)
from lossy_hooks.study.sweeping.planning import FolderCollisionError
from lossy_hooks.study.sweeping.report import print_log_tail
from lossy_hooks.study.sweeping.runner import run_sweep

__all__ = ["main", "print_results", "print_status"]

# files that make a folder of RUNS_DIR a configuration folder for --status
_FOLDER_FILES = ("*/config.json", f"*/{JOB_RECORD}")


def print_status(runs_dirs: list[Path], console: Console) -> int:
    """``sweep --status``: each configuration of each folder (those its sweeps planned, and
    any configuration folder in it) with its state; a failed one's log's last lines after
    the table. Returns 2 if a folder does not exist, else 0."""
    table = Table(title="configurations")
    for col in ("configuration", "state", "job", "detail"):
        table.add_column(col)
    failed: list[tuple[str, ConfigState]] = []
    counts: dict[str, int] = {}
    for runs_dir in runs_dirs:
        if not runs_dir.is_dir():
            console.print(f"sweep --status: {runs_dir} is not a folder", markup=False)
            return 2
        planned = planned_configurations(runs_dir)
        found = {p.parent.name for pattern in _FOLDER_FILES for p in runs_dir.glob(pattern)}
        for name in sorted(set(planned) | found):
            entry = planned.get(name, {})
            state = config_state(runs_dir / name, entry.get("rounds"))
            counts[state.state] = counts.get(state.state, 0) + 1
            settings = " ".join(f"{k}={v}" for k, v in entry.get("settings", {}).items())
            table.add_row(
                escape(f"{settings}\n{name}" if settings else name),
                state.state,
                state.job_id or "-",
                escape(state.detail),
            )
            if state.state == "failed":
                failed.append((name, state))
    console.print(table)
    for name, state in failed:
        console.print(f"failed: {name}", markup=False)
        print_log_tail(state.log_tail, state.log, console)
    summary = ", ".join(f"{counts[s]} {s}" for s in STATES if counts.get(s))
    console.print(summary or "no configurations", markup=False)
    return 0


def _load_config(path: str) -> dict[str, Any]:
    """A sweep's config file: TOML (``.toml``) or JSON."""
    if path.endswith(".toml"):
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# the cluster flags a config file's [cluster] table may hold (slurm_arg: a list of KEY=VALUE)
CLUSTER_KEYS = ("executor", "nodes", "gpus_per_node", "partition", "time", "account", "slurm_arg")
CLUSTER_DEFAULTS = {"executor": "local", "nodes": 1, "gpus_per_node": 0}


def _parser() -> argparse.ArgumentParser:
    """The sweep's flags (the study script's own come after a lone ``--``)."""
    p = argparse.ArgumentParser(
        description="Run a grid of train_ddp.py configurations: with torchrun here, or as submitit "
        "jobs on SLURM (or submitit's local executor).",
        usage="%(prog)s [--config FILE] [--nproc N] [--grid FLAG=V1,V2 ...] [--log_dir DIR] "
        "[--executor local|slurm|submitit-local] [SLURM options] [-- TRAIN_DDP_FLAGS ...]\n"
        "       %(prog)s --status RUNS_DIR [RUNS_DIR ...]",
        epilog="Everything after a lone '--' is passed to every train_ddp.py run as fixed flags "
        "(e.g. -- --dataset digits --model resnet18 --use_avg); train_ddp.py's own flags are "
        "listed by 'python train_ddp.py --help'. A configuration whose flags train_ddp.py "
        "rejects is reported with train_ddp.py's message and not launched.",
    )
    p.add_argument(
        "--config",
        help="TOML or JSON file with nproc, fixed, grid and a cluster table (executor, nodes, gpus_per_node, "
        "partition, time, account, slurm_arg); flags on the command line win",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="ranks per configuration (>= 1; default 2); on a submitit executor without GPUs, ranks per node",
    )
    p.add_argument(
        "--grid",
        nargs="*",
        default=[],
        metavar="FLAG=V1,V2",
        help="grid axes, e.g. loss_rate=0,0.1 drop_point=worker,post",
    )
    p.add_argument(
        "--log_dir",
        default=None,
        help="local: keep each launch's output here (default: a temporary folder keeping failed "
        "launches' logs); slurm / submitit-local: submitit's job files and logs (default <output_dir>/jobs)",
    )
    p.add_argument(
        "--status",
        nargs="+",
        default=None,
        metavar="RUNS_DIR",
        help="print each configuration's state in these folders (done, running with its job, pending, "
        "failed with its log's last lines, interrupted, not started) and exit",
    )
    _add_cluster_flags(p)
    return p


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a submitit executor: where and how big each configuration's job is."""
    c = p.add_argument_group("on a cluster (the cluster extra: pip install -e '.[cluster]')")
    c.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=None,
        help="local (the default): torchrun here, one configuration after another; slurm: one submitit "
        "job per configuration (one job array); submitit-local: the same jobs as processes here",
    )
    c.add_argument("--nodes", type=int, default=None, help="nodes per configuration's job (>= 1; default 1)")
    c.add_argument(
        "--gpus_per_node",
        type=int,
        default=None,
        help="GPUs per node, one rank each (default 0: --nproc CPU ranks per node)",
    )
    c.add_argument("--partition", default=None, help="SLURM partition")
    c.add_argument(
        "--time",
        default=None,
        help="each job's wall-clock limit, as sbatch reads it (MM, HH:MM:SS, D-HH:MM:SS); needed by slurm",
    )
    c.add_argument("--account", default=None, help="SLURM account to charge")
    c.add_argument(
        "--slurm_arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more sbatch options, e.g. qos=high, mem=64G, constraint=h100, cpus_per_task=8 (repeatable)",
    )
    c.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wait for the jobs and report their outcomes (default: yes, except with --executor slurm, "
        "which returns once they are submitted: watch them with --status)",
    )


def print_results(records: list[dict[str, Any]], console: Console) -> int:
    """The end table (each configuration's settings, outcome and folder; a failed one's
    reason and log) and the counts line. Returns 1 if a configuration failed or was invalid,
    else 0."""
    table = Table(title=f"sweep: {len(records)} configurations")
    for col in ("settings", "outcome", "folder"):
        table.add_column(col)
    for r in records:
        outcome = r["outcome"]
        if "why" in r:  # the line that says why, and where the rest is
            outcome += f": {r['why']}" + (f"\nlog: {r['log']}" if r["log"] else "")
        table.add_row(
            escape(" ".join(f"{k}={v}" for k, v in r["settings"].items())),
            escape(outcome),  # log text is not markup: "[rank0]:" stays, "[/x]" cannot break the table
            Path(r["run_dir"]).name if r["run_dir"] else "-",
        )
    console.print(table)
    outcomes = [r["outcome"] for r in records]
    failed = sum(o.startswith(("failed", "invalid")) for o in outcomes)
    console.print(
        f"{sum(o in ('finished', 'diverged', 'unfinished') for o in outcomes)} ran, "
        f"{sum(o.startswith('skipped') for o in outcomes)} skipped, "
        f"{sum(o.startswith('submitted') for o in outcomes)} submitted, "
        f"{sum('diverged' in o for o in outcomes)} diverged, {failed} failed"
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``--status``, or a sweep: the config file and the flags merged (a flag wins), the
    cluster settings checked, then :func:`~lossy_hooks.study.sweeping.runner.run_sweep` and
    its table. Returns 1 if a configuration failed or was invalid."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = _parser()
    args = p.parse_args(argv)
    console = Console()
    if args.status:
        return print_status([Path(d) for d in args.status], console)
    spec = _load_config(args.config) if args.config else {}
    nproc = args.nproc or int(spec.get("nproc", 2))
    # the config file's [cluster] table: a flag given on the command line wins
    cluster = dict(spec.get("cluster", {}))
    unknown = sorted(set(cluster) - set(CLUSTER_KEYS))
    if unknown:
        p.error(f"{args.config}: unknown [cluster] keys {unknown}; known: {', '.join(CLUSTER_KEYS)}")
    for key in CLUSTER_KEYS[:-1]:
        if getattr(args, key) is None:
            setattr(args, key, cluster.get(key, CLUSTER_DEFAULTS.get(key)))
    slurm_args = [*map(str, cluster.get("slurm_arg", [])), *args.slurm_arg]
    if args.nproc is not None and args.gpus_per_node:
        p.error("--nproc and --gpus_per_node both set the ranks per node: with GPUs it is one rank per GPU")
    try:
        time_min = parse_slurm_time(str(args.time)) if args.time is not None else None
        resources = ClusterResources(
            nodes=int(args.nodes),
            gpus_per_node=int(args.gpus_per_node),
            nproc=nproc,
            partition=args.partition,
            time_min=time_min,
            account=args.account,
        ).with_slurm_args(slurm_args)
        if args.executor not in EXECUTORS:
            raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}, got {args.executor!r}")
        resources.check(args.executor)
        if args.executor in SUBMITIT_EXECUTORS:
            require("cluster")
            if args.executor == "slurm":
                resources.slurm_parameters()
    except (ValueError, MissingExtraError) as e:
        p.error(str(e))
    grid = {k: list(v) for k, v in spec.get("grid", {}).items()}
    for item in args.grid:
        if "=" not in item:
            p.error(f"--grid entries look like flag=v1,v2; got {item!r}")
        key, values = item.split("=", 1)
        grid[key.lstrip("-")] = [parse_value(v) for v in values.split(",")]
    fixed = dict(spec.get("fixed", {})) | parse_fixed(extra)
    wait = args.wait if args.wait is not None else args.executor != "slurm"
    log_dir = Path(args.log_dir) if args.log_dir else None
    try:
        records = run_sweep(nproc, fixed, grid, log_dir, console, args.executor, resources, wait)
    except FolderCollisionError as e:
        p.error(str(e))
    return print_results(records, console)


if __name__ == "__main__":
    sys.exit(main())

"""Run a grid of train_ddp.py configurations: each a torchrun launch here, or a submitit job on
SLURM (``--executor slurm``) or on this machine (``--executor submitit-local``).

    python -m lossy_hooks.sweep --nproc 2 --grid loss_rate=0,0.1,0.3 drop_point=worker,post \\
        fill=zero,rescale -- --dataset digits --model resnet18 --num_epochs 4 --lab_round 2
    python -m lossy_hooks.sweep --config sweep.toml        # or .json
    python -m lossy_hooks.sweep --executor slurm --nodes 2 --gpus_per_node 8 --partition gpu \\
        --time 4:00:00 --grid loss_rate=0,0.01,0.05 fill=zero,rescale -- --model resnet50 ...
    python -m lossy_hooks.sweep --status runs/

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
(:mod:`lossy_hooks.study.config_state`); jobs are :mod:`lossy_hooks.study.jobs`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the tomli package (a dependency there)
    import tomli as tomllib

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lossy_hooks.core.process_group import free_port
from lossy_hooks.study.cli import resolve
from lossy_hooks.study.config_state import (
    JOB_RECORD,
    STATES,
    ConfigState,
    config_state,
    failure_excerpt,
    planned_configurations,
    record_job,
    record_planned,
)
from lossy_hooks.study.extras import MissingExtraError, require
from lossy_hooks.study.flags import build_parser
from lossy_hooks.study.jobs import (
    EXECUTORS,
    SUBMITIT_EXECUTORS,
    ClusterResources,
    TrainJob,
    job_log_paths,
    make_executor,
    parse_slurm_time,
)
from lossy_hooks.study.run_control import LOCK_NAME
from lossy_hooks.study.run_io import round_status
from lossy_hooks.study.run_names import config_name

__all__ = [
    "FolderCollisionError",
    "expand_grid",
    "flags_for",
    "launch_train",
    "main",
    "parse_fixed",
    "plan",
    "run_config",
    "run_dir_for",
    "run_sweep",
]

# the study script, launched as a module so that an installed (non-editable) package runs it
TRAIN_MODULE = "lossy_hooks.study.train"
# train_ddp.py flags that take several values (--fec G R)
MULTI_VALUE_FLAGS = {"fec"}
BOOLEAN_FLAGS = {
    "use_zero",
    "use_avg",
    "worker_drop",
    "amp",
    "download",
    "measure_fidelity",
    "overwrite",
    "error_feedback",
}


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the grid, in the order given (last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def flags_for(settings: dict[str, Any]) -> list[str]:
    """train_ddp.py flags for ``{flag: value}``; booleans add or omit the flag; a list (or, for
    a flag taking several values such as ``fec``, a text with spaces: ``"8 1"``) gives
    several values."""
    out: list[str] = []
    for key, value in settings.items():
        name = "--" + key.lstrip("-")
        if key.lstrip("-") in BOOLEAN_FLAGS or isinstance(value, bool):
            if value:
                out.append(name)
        elif isinstance(value, (list, tuple)):
            out += [name, *map(str, value)]
        elif isinstance(value, str) and key.lstrip("-") in MULTI_VALUE_FLAGS:
            out += [name, *value.split()]
        else:
            out += [name, str(value)]
    return out


def parse_fixed(extra: list[str]) -> dict[str, Any]:
    """Flags after ``--`` as ``{flag: value}``: a flag alone is ``True``, a flag with several
    values (``--fec 8 1``) a list."""
    fixed: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        key = extra[i].lstrip("-")
        j = i + 1
        while j < len(extra) and not extra[j].startswith("--"):
            j += 1
        values = [_parse_value(v) for v in extra[i + 1 : j]]
        fixed[key] = True if not values else values[0] if len(values) == 1 else values
        i = j
    return fixed


def run_dir_for(argv: list[str], nproc: int) -> tuple[Path | None, str]:
    """The configuration folder train_ddp.py would use, and ``""``; or ``None`` and
    train_ddp.py's own error message when the flags are invalid."""
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    os.environ.update(RANK="0", WORLD_SIZE=str(nproc))
    errors = io.StringIO()
    try:
        parser = build_parser(prog="train_ddp.py")
        with contextlib.redirect_stderr(errors):
            cfg = resolve(parser.parse_args(argv), parser)
        return Path(cfg["output_dir"]) / config_name(cfg), ""
    except SystemExit:
        lines = [ln for ln in errors.getvalue().splitlines() if ln.strip()]
        return None, lines[-1] if lines else "invalid flags"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launch_train(argv: list[str], nproc: int, log: Any = None) -> subprocess.CompletedProcess:
    """One ``torchrun`` launch of train_ddp.py with ``argv`` on ``nproc`` ranks (output to
    ``log``, a file, or captured when ``None``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += [f"--master_port={free_port()}", "-m", TRAIN_MODULE, *argv]
    if log is None:
        return subprocess.run(cmd, capture_output=True, text=True)
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)


def run_config(argv: list[str], nproc: int, label: str = "") -> Path:
    """Launch one configuration (``--resume``: a finished one is not run again) and return
    its folder; exit with train_ddp.py's message when the flags are invalid or the run fails.
    The study tools' one way to run a configuration."""
    run_dir, error = run_dir_for(argv, nproc)
    if run_dir is None:
        raise SystemExit(f"{label or 'configuration'}: invalid flags ({error})")
    print(f"{label + ': ' if label else ''}{run_dir.name}", flush=True)
    res = launch_train([*argv, "--resume"], nproc)
    if res.returncode != 0:
        raise SystemExit(res.stdout[-2000:] + res.stderr[-2000:])
    return run_dir


def _outcome(run_dir: Path, rounds: int) -> str:
    ended = [round_status(run_dir / f"round{k}") for k in range(rounds)]
    if any(s is None for s in ended):
        return "unfinished"
    return "diverged" if "diverged" in ended else "finished"


# files that make a folder of RUNS_DIR a configuration folder for --status
_FOLDER_FILES = ("*/config.json", f"*/{JOB_RECORD}")
# states of a configuration the sweep leaves alone: someone runs it, or it is queued
_BUSY_STATES = ("running", "pending", "unknown")


class FolderCollisionError(ValueError):
    """Two configurations of a sweep would write one run folder."""


def _check_folders(records: list[dict[str, Any]]) -> None:
    """Refuse (``FolderCollisionError``, before anything runs) a plan in which two
    configurations name one run folder: the second would find the first's results."""
    by_dir: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r["run_dir"]:
            by_dir.setdefault(r["run_dir"], []).append(r)
    shared = {d: rs for d, rs in by_dir.items() if len(rs) > 1}
    if shared:
        lines = [f"{d}: " + "; ".join(r["label"] for r in rs) for d, rs in sorted(shared.items())]
        raise FolderCollisionError(
            f"{sum(len(rs) for rs in shared.values())} configurations would share "
            f"{len(shared)} run folder(s), so one would take the other's results; the grid "
            "differs there only in flags that do not change a run (CONTROL_FLAGS) or lists a "
            "value twice:\n  " + "\n  ".join(lines)
        )


def plan(
    fixed: dict[str, Any], grid: dict[str, list[Any]], world: int, console: Console
) -> list[dict[str, Any]]:
    """One record per configuration of the grid, each checked before anything runs:
    ``"outcome"`` already set for an invalid, finished or busy one, absent for one to run.
    Two configurations that name one folder: ``FolderCollisionError``, nothing done."""
    records = []
    combos = expand_grid(grid) or [{}]
    for i, combo in enumerate(combos):
        settings = {**fixed, **combo}
        argv = flags_for(settings)
        run_dir, error = run_dir_for(argv, world)
        records.append(
            {
                "index": i,
                "settings": combo,
                "label": " ".join(f"{k}={v}" for k, v in combo.items()) or "(fixed flags)",
                "argv": argv,
                "rounds": int(settings.get("lab_round", 5)),
                "run_dir": str(run_dir) if run_dir else None,
                "error": error,
            }
        )
    _check_folders(records)
    for record in records:
        error = record.pop("error")
        run_dir = Path(record["run_dir"]) if record["run_dir"] else None
        if run_dir is None:
            record["outcome"] = f"invalid flags ({error})"
        elif (done := _outcome(run_dir, record["rounds"])) in ("finished", "diverged"):
            record["outcome"] = f"skipped ({done})"
        else:
            state = config_state(run_dir, record["rounds"])
            if state.state in _BUSY_STATES:
                job = f", job {state.job_id}" if state.job_id else ""
                record["outcome"] = f"skipped ({state.state}{job})"
            elif state.stale_lock:  # left on another host by a job the scheduler says has ended
                (run_dir / LOCK_NAME).unlink(missing_ok=True)
        if "outcome" in record:
            _print_outcome(record, len(combos), [], console)
    by_folder: dict[Path, dict[str, dict[str, Any]]] = {}
    for r in records:
        if r["run_dir"]:
            run_dir = Path(r["run_dir"])
            by_folder.setdefault(run_dir.parent, {})[run_dir.name] = {
                "settings": r["settings"],
                "rounds": r["rounds"],
            }
    for runs_dir, planned in by_folder.items():
        record_planned(runs_dir, planned)
    return records


def _report_failure(record: dict[str, Any], log: Path | None) -> list[str]:
    """Put why a run failed into its record (``"why"``; ``"log"``, its path or ``None`` when
    there is none) and return the log's last lines."""
    if log is None or not log.exists():
        record["why"], record["log"] = "no log found", None
        return []
    excerpt, record["why"] = failure_excerpt(log)
    record["log"] = str(log)
    return excerpt


def _print_log_tail(lines: list[str] | tuple[str, ...], log: str | None, console: Console) -> None:
    """A failed run's log: its last ``lines``, indented, then its path."""
    if log is None:
        console.print("    (no log found)", markup=False)
        return
    console.print("\n".join(f"    {ln}" for ln in lines), markup=False, highlight=False)
    console.print(f"    (the whole output: {log})", markup=False, highlight=False)


def _print_outcome(record: dict[str, Any], total: int, excerpt: list[str], console: Console) -> None:
    console.print(f"[{record['index'] + 1}/{total}] {record['label']}: {record['outcome']}", markup=False)
    if "why" in record:
        _print_log_tail(excerpt, record["log"], console)


def _run_here(records: list[dict[str, Any]], nproc: int, log_dir: Path | None, console: Console) -> None:
    """``--executor local``: each configuration to run, one torchrun launch after another.
    Each launch's output goes to ``log_dir/config<i>.log`` (without ``log_dir``: a temporary
    folder, where only the logs of failed launches are kept)."""
    keep_all = log_dir is not None
    logs = log_dir if log_dir is not None else Path(tempfile.mkdtemp(prefix="lossy_sweep_logs_"))
    todo = [r for r in records if "outcome" not in r]
    with Progress(
        TextColumn("[bold]sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[current]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("sweep", total=len(todo), current="")
        for record in todo:
            progress.update(task, current=record["label"])
            run_dir = Path(record["run_dir"])
            logs.mkdir(parents=True, exist_ok=True)
            log_path = logs / f"config{record['index']:03d}.log"
            record_job(run_dir, "local", None, [str(log_path)], None)
            with open(log_path, "w") as log:
                code = launch_train([*record["argv"], "--resume"], nproc, log).returncode
            record["outcome"] = f"failed (exit {code})" if code else _outcome(run_dir, record["rounds"])
            excerpt = _report_failure(record, log_path) if code else []
            if not code and not keep_all:
                log_path.unlink()
            _print_outcome(record, len(records), excerpt, console)
            progress.advance(task)
    if not keep_all and not any(logs.iterdir()):  # nothing failed: no temporary folder left behind
        logs.rmdir()


def _submit(
    records: list[dict[str, Any]],
    executor: str,
    resources: ClusterResources,
    job_dir: Path,
    wait: bool,
    console: Console,
) -> None:
    """``--executor slurm | submitit-local``: every configuration to run as one submitit job
    (together one SLURM job array), recorded in its folder's job.json; with ``wait``, each
    job's end and outcome as it comes."""
    todo = [r for r in records if "outcome" not in r]
    if not todo:
        return
    ex = make_executor(executor, job_dir, resources)
    with ex.batch():
        jobs = [ex.submit(TrainJob(r["argv"])) for r in todo]
    for record, job in zip(todo, jobs, strict=True):
        logs = job_log_paths(job_dir, job.job_id, resources.world_size)
        record_job(Path(record["run_dir"]), executor, job.job_id, logs, str(job_dir))
        record["job_id"] = job.job_id
        record["outcome"] = f"submitted (job {job.job_id})"
        _print_outcome(record, len(records), [], console)
    if not wait:
        runs = sorted({str(Path(r["run_dir"]).parent) for r in todo})
        console.print(f"watch them with: python -m lossy_hooks.sweep --status {' '.join(runs)}", markup=False)
        return
    for record, job in zip(todo, jobs, strict=True):
        excerpt: list[str] = []
        try:
            job.results()  # one result per task
            record["outcome"] = _outcome(Path(record["run_dir"]), record["rounds"])
        except Exception as e:  # the job raised, was killed or was cancelled
            record["outcome"] = f"failed (job {job.job_id}: {type(e).__name__})"
            state = config_state(Path(record["run_dir"]), record["rounds"])
            excerpt = _report_failure(record, Path(state.log) if state.log else None)
        _print_outcome(record, len(records), excerpt, console)


def run_sweep(
    nproc: int,
    fixed: dict[str, Any],
    grid: dict[str, list[Any]],
    log_dir: Path | None = None,
    console: Console | None = None,
    executor: str = "local",
    resources: ClusterResources | None = None,
    wait: bool = True,
) -> list[dict[str, Any]]:
    """Run every configuration; return one record per configuration with its outcome.

    Every configuration is checked first: an invalid one is reported and not run, a finished
    one skipped, one that a live process writes or a job holds (running, pending) left alone.
    ``executor="local"`` then launches the others here with torchrun on ``nproc`` ranks,
    one after another; ``"slurm"`` / ``"submitit-local"`` submit them as jobs of
    ``resources`` (their files under ``log_dir``, default ``<output_dir>/jobs``) and, with
    ``wait``, wait for them. A failed run's last ``FAILED_TAIL_LINES`` lines are printed
    after it, with the log's path (in its record as ``"log"``, and the line that says why
    as ``"why"``)."""
    console = console or Console()
    resources = resources or ClusterResources(nproc=nproc)
    resources.check(executor)
    world = resources.world_size if executor in SUBMITIT_EXECUTORS else nproc
    records = plan(fixed, grid, world, console)
    if executor == "local":
        _run_here(records, nproc, log_dir, console)
    else:
        job_dir = log_dir or Path(str(fixed.get("output_dir", "runs"))) / "jobs"
        _submit(records, executor, resources, job_dir.absolute(), wait, console)
    for r in records:
        for key in ("index", "label", "argv", "rounds"):
            r.pop(key, None)
    return records


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
        found = {
            p.parent.name for pattern in ("*/config.json", f"*/{JOB_RECORD}") for p in runs_dir.glob(pattern)
        }
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
        _print_log_tail(state.log_tail, state.log, console)
    summary = ", ".join(f"{counts[s]} {s}" for s in STATES if counts.get(s))
    console.print(summary or "no configurations", markup=False)
    return 0


def _load_config(path: str) -> dict[str, Any]:
    if path.endswith(".toml"):
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# the cluster flags a config file's [cluster] table may hold (slurm_arg: a list of KEY=VALUE)
CLUSTER_KEYS = ("executor", "nodes", "gpus_per_node", "partition", "time", "account", "slurm_arg")
CLUSTER_DEFAULTS = {"executor": "local", "nodes": 1, "gpus_per_node": 0}


def _parser() -> argparse.ArgumentParser:
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
    return p


def main(argv: list[str] | None = None) -> int:
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
        grid[key.lstrip("-")] = [_parse_value(v) for v in values.split(",")]
    fixed = dict(spec.get("fixed", {})) | parse_fixed(extra)
    wait = args.wait if args.wait is not None else args.executor != "slurm"
    log_dir = Path(args.log_dir) if args.log_dir else None
    try:
        records = run_sweep(nproc, fixed, grid, log_dir, console, args.executor, resources, wait)
    except FolderCollisionError as e:
        p.error(str(e))
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


if __name__ == "__main__":
    sys.exit(main())

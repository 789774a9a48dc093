"""A sweep run: its plan (:mod:`.planning`), then each configuration to run launched here
with ``torchrun`` one after another (``executor="local"``), or submitted as one submitit job
each (``"slurm"``, ``"submitit-local"``: :mod:`.jobs`), each recorded in its folder's
job.json; a failing or diverging configuration does not stop the others."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lossy_hooks.study.sweeping.config_state import config_state, record_job
from lossy_hooks.study.sweeping.jobs import (
    SUBMITIT_EXECUTORS,
    ClusterResources,
    TrainJob,
    job_log_paths,
    make_executor,
)
from lossy_hooks.study.sweeping.launch import launch_train
from lossy_hooks.study.sweeping.planning import plan, run_outcome
from lossy_hooks.study.sweeping.report import print_outcome, report_failure

__all__ = ["STATUS_COMMAND", "run_sweep"]

# how a sweep that returns once its jobs are submitted tells where to watch them
STATUS_COMMAND = "python -m lossy_hooks.tools.sweep --status"


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
            record["outcome"] = f"failed (exit {code})" if code else run_outcome(run_dir, record["rounds"])
            excerpt = report_failure(record, log_path) if code else []
            if not code and not keep_all:
                log_path.unlink()
            print_outcome(record, len(records), excerpt, console)
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
        print_outcome(record, len(records), [], console)
    if not wait:
        runs = sorted({str(Path(r["run_dir"]).parent) for r in todo})
        console.print(f"watch them with: {STATUS_COMMAND} {' '.join(runs)}", markup=False)
        return
    for record, job in zip(todo, jobs, strict=True):
        excerpt: list[str] = []
        try:
            job.results()  # one result per task
            record["outcome"] = run_outcome(Path(record["run_dir"]), record["rounds"])
        except Exception as e:  # the job raised, was killed or was cancelled
            record["outcome"] = f"failed (job {job.job_id}: {type(e).__name__})"
            state = config_state(Path(record["run_dir"]), record["rounds"])
            excerpt = report_failure(record, Path(state.log) if state.log else None)
        print_outcome(record, len(records), excerpt, console)


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

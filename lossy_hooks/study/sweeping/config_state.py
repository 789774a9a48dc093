"""What state a configuration folder is in, for the sweep (which configurations to run) and
``sweep --status`` (what to show), and the sweep's record of the job that runs it.

A configuration is, in this order (the first that holds):

    done         every round ended (status.json: finished or diverged)
    running      a live process holds its writer lock (``.lock``), or its recorded job is
                 running as the scheduler says
    pending      its recorded job waits in the scheduler's queue
    unknown      its recorded job's state cannot be read (no ``sacct`` here)
    failed       its recorded job (or launch) ended without finishing every round: the
                 log's last lines say why
    interrupted  it has results but no job record, and nothing writes it: the next sweep
                 resumes it
    not started  nothing has run

Files::

    <output_dir>/<config>/job.json   the sweep's last launch or submission of it: executor,
                                     job id, the log of each task, when
    <output_dir>/sweep.json          the configurations the sweeps of this folder planned
                                     (``not started`` ones have no folder yet)
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lossy_hooks.study.run_control import LOCK_NAME, live_lock_owner
from lossy_hooks.study.run_io import read_json, round_status, write_json

__all__ = [
    "FAILED_TAIL_LINES",
    "JOB_RECORD",
    "MANIFEST",
    "STATES",
    "ConfigState",
    "config_state",
    "failure_excerpt",
    "planned_configurations",
    "read_job",
    "record_job",
    "record_planned",
]

STATES = ("done", "running", "pending", "unknown", "failed", "interrupted", "not started")
JOB_RECORD = "job.json"
MANIFEST = "sweep.json"
FAILED_TAIL_LINES = 15  # lines of a failed run's log shown after it
# an exception line, optionally behind torchrun's "[rankN]:" prefix: "RuntimeError: ...",
# "torch.OutOfMemoryError: ...", "KeyboardInterrupt"
_ERROR_LINE = re.compile(r"^(\[rank\d+\]:\s*)?(\w+\.)*\w*(Error|Exception|Interrupt)\b")


def failure_excerpt(log: Path, lines: int = FAILED_TAIL_LINES) -> tuple[list[str], str]:
    """What a failed run's log says about why: its last ``lines`` non-blank lines before
    torchrun's own report (the launcher's ``ChildFailedError`` traceback and banner, which
    say only that a rank failed), then the banner's rank and exit code in one line; and the
    one line for a table (the ranks' last exception line, else the last line)."""
    text = log.read_text(encoding="utf-8", errors="replace").splitlines()
    cut = next((i for i, ln in enumerate(text) if "ChildFailedError" in ln), None)
    summary = []
    if cut is not None:
        tracebacks = [i for i in range(cut) if text[i].startswith("Traceback (most recent call last)")]
        start = tracebacks[-1] if tracebacks else cut
        fields = (ln.split(":", 1) for ln in text[cut:] if " : " in ln)
        banner = {key.strip(): value.strip() for key, value in fields}
        if "exitcode" in banner:
            summary = [f"torchrun: rank {banner.get('rank', '?')} failed, exitcode {banner['exitcode']}"]
        text = text[:start]
    kept = [ln for ln in text if ln.strip()]
    errors = [ln.strip() for ln in kept if _ERROR_LINE.search(ln.strip())]
    headline = errors[-1] if errors else (kept[-1].strip() if kept else (summary or ["(no output)"])[0])
    return kept[-lines:] + summary, headline


def record_job(run_dir: Path, executor: str, job_id: str | None, logs: list[str], folder: str | None) -> None:
    """Record that ``executor`` launched or submitted ``run_dir`` (as ``job_id``, its tasks'
    output in ``logs``, submitit's files under ``folder``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        run_dir / JOB_RECORD,
        {
            "executor": executor,
            "job_id": job_id,
            "logs": logs,
            "folder": folder,
            "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
            "host": socket.gethostname(),
        },
    )


def read_job(run_dir: Path) -> dict[str, Any] | None:
    try:
        return read_json(run_dir / JOB_RECORD)
    except (OSError, ValueError):
        return None


def record_planned(runs_dir: Path, planned: dict[str, dict[str, Any]]) -> None:
    """Add ``{folder name: {"settings": ..., "rounds": n}}`` to ``runs_dir/sweep.json``."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    known = planned_configurations(runs_dir)
    write_json(runs_dir / MANIFEST, {"configurations": known | planned})


def planned_configurations(runs_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        return dict(read_json(runs_dir / MANIFEST).get("configurations", {}))
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class ConfigState:
    """A configuration's state (one of :data:`STATES`), a line of detail, its job, and for a
    failed one the log and its last lines. ``stale_lock``: its lock was left by a job the
    scheduler says has ended (on another host, so no PID check could clear it)."""

    state: str
    detail: str = ""
    job_id: str | None = None
    log: str | None = None
    log_tail: tuple[str, ...] = field(default=())
    stale_lock: bool = False


def _rounds_of(run_dir: Path, rounds: int | None) -> int:
    try:
        return int(read_json(run_dir / "config.json")["lab_round"])
    except (OSError, ValueError, KeyError):
        return rounds if rounds is not None else 1


def _job_active(job: dict[str, Any]) -> tuple[bool | None, str]:
    """Whether a recorded job may still run (``None``: the scheduler cannot say)."""
    if job.get("executor") == "local" or not job.get("job_id"):
        return False, "ENDED"  # a torchrun launch: only its lock says it runs
    from lossy_hooks.study.sweeping.jobs import submitit_job_active

    return submitit_job_active(job["executor"], job["job_id"])


def _failed_log(job: dict[str, Any]) -> tuple[str | None, tuple[str, ...], str]:
    """The log of the task that failed (the first with an exception line, else the first),
    its last lines and the line that says why."""
    logs = [Path(p) for p in job.get("logs", []) if Path(p).exists()]
    best: tuple[str | None, tuple[str, ...], str] = (None, (), "no log found")
    for path in logs:
        tail, why = failure_excerpt(path)
        if best[0] is None or _ERROR_LINE.search(why):
            best = (str(path), tuple(tail), why)
            if _ERROR_LINE.search(why):
                break
    return best


def config_state(run_dir: Path, rounds: int | None = None) -> ConfigState:
    """The state of the configuration in ``run_dir`` (its number of rounds from its
    config.json, else ``rounds``)."""
    n = _rounds_of(run_dir, rounds)
    ended = [round_status(run_dir / f"round{k}") for k in range(n)]
    if all(ended):
        diverged = ended.count("diverged")
        detail = f"{n - diverged} finished, {diverged} diverged" if diverged else "finished"
        return ConfigState("done", detail)
    job = read_job(run_dir)
    owner = live_lock_owner(run_dir)
    active, scheduler_state = _job_active(job) if job else (False, "")
    job_id = job.get("job_id") if job else None
    progress = f"{sum(1 for s in ended if s)}/{n} rounds ended"
    if owner is not None:
        # a lock on another host cannot be checked by PID: stale only if its job has ended
        other_host = owner.get("host") != socket.gethostname()
        if not (other_host and job_id and owner.get("job") == job_id and active is False):
            where = f"PID {owner.get('pid')} on {owner.get('host')}"
            return ConfigState("running", f"{progress}; {where}", owner.get("job") or job_id)
    stale = owner is not None
    if job and active:
        state = "pending" if scheduler_state == "PENDING" else "running"
        return ConfigState(state, f"{progress}; {job['executor']} {scheduler_state}", job_id)
    if job and active is None:
        return ConfigState("unknown", f"{progress}; the scheduler cannot say ({scheduler_state})", job_id)
    if job:
        log, tail, why = _failed_log(job)
        return ConfigState("failed", f"{progress}; {why}", job_id, log, tail, stale)
    if (run_dir / "config.json").exists() or (run_dir / LOCK_NAME).exists():
        return ConfigState("interrupted", f"{progress}; the next sweep resumes it")
    return ConfigState("not started")

"""Who may write a run folder, and what a run records about where it ran: the writer lock
(``<config>/.lock``: host and PID), the environment saved in config.json, and fault injection
for the crash-safety tests (``LOSSY_HOOKS_FAULT``)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lossy_hooks.study.run_io import read_json, write_json

__all__ = [
    "FAULT_ENV",
    "LOCK_NAME",
    "RUN_COMMANDS",
    "acquire_lock",
    "current_job_id",
    "environment_info",
    "fault_point",
    "live_lock_owner",
    "pid_alive",
    "release_lock",
    "writer_refusal",
]

LOCK_NAME = ".lock"
# command lines of a process that may write a run folder: the study script, or a submitit job's
# task running it (sweep --executor slurm / submitit-local)
RUN_COMMANDS = (b"train_ddp", b"lossy_hooks.study.train", b"lossy-train", b"submitit.core._submit")


def pid_alive(pid: int, commands: tuple[bytes, ...] = RUN_COMMANDS) -> bool:
    """Whether ``pid`` is a live process on this host whose command line holds one of
    ``commands`` (by default: a process that could write a run folder). A reused PID running
    something else, or a zombie (its command line is empty), counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except OSError:
        return True  # no /proc: trust kill(pid, 0)
    return any(name in cmdline for name in commands)


def current_job_id() -> str | None:
    """The scheduler job this process runs in: SLURM's (``<array job>_<task>`` in an array), or
    submitit-local's; ``None`` outside a job. A requeued SLURM job keeps its id."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or None


def live_lock_owner(run_dir: Path) -> dict[str, Any] | None:
    """The owner recorded in ``run_dir/.lock`` if it may still be writing: a live process on
    this host, or any process on another host (which cannot be checked from here) unless it
    ran in this process's own scheduler job (a requeued job: the scheduler runs one
    incarnation of a job at a time, so the earlier one is gone). ``None`` when there is no
    lock or it is stale."""
    path = run_dir / LOCK_NAME
    try:
        owner = read_json(path)
    except (OSError, ValueError):
        return None
    same_host = owner.get("host") == socket.gethostname()
    if same_host and not pid_alive(int(owner.get("pid", -1))):
        return None
    job = current_job_id()
    if not same_host and job is not None and owner.get("job") == job:  # this job's earlier incarnation
        return None
    return owner


def acquire_lock(run_dir: Path) -> None:
    """Record this process as the writer of ``run_dir`` (atomically replaces a stale lock)."""
    write_json(
        run_dir / LOCK_NAME,
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "job": current_job_id(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )


def release_lock(run_dir: Path) -> None:
    """Remove ``run_dir/.lock`` if this process owns it."""
    path = run_dir / LOCK_NAME
    try:
        owner = read_json(path)
    except (OSError, ValueError):
        return
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def writer_refusal(run_dir: Path) -> str | None:
    """Why this process may not write ``run_dir`` (another live process holds its lock), or
    ``None``."""
    owner = live_lock_owner(run_dir)
    if owner is None:
        return None
    return (
        f"{run_dir} is being written by PID {owner.get('pid')} on {owner.get('host')} "
        f"(since {owner.get('started')}); stop that run first (README: stopping a run), or "
        f"delete {run_dir / LOCK_NAME} if that process is gone"
    )


def environment_info(**versions: str) -> dict[str, Any]:
    """Versions, git commit, host and CUDA of this run (``versions``: more packages)."""
    from lossy_hooks import __version__

    commit = None
    with contextlib.suppress(Exception):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(__file__).parents[2],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
    return {
        "torch": torch.__version__,
        "lossy_hooks": __version__,
        **versions,
        "python": sys.version.split()[0],
        "git_commit": commit,
        "host": socket.gethostname(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


# Fault injection for tests: LOSSY_HOOKS_FAULT=<kill|stop>:<point>:<epoch> sends this process
# SIGKILL (a crash) or SIGSTOP (a hung writer) at that point.
FAULT_ENV = "LOSSY_HOOKS_FAULT"


def fault_point(name: str, epoch: int) -> None:
    """Send this process SIGKILL or SIGSTOP at a named point when LOSSY_HOOKS_FAULT says so
    (tests of crash safety: a real signal at a known place, not a timed guess)."""
    for action, sig in (("kill", signal.SIGKILL), ("stop", signal.SIGSTOP)):
        if os.environ.get(FAULT_ENV) == f"{action}:{name}:{epoch}":
            os.kill(os.getpid(), sig)

"""A sweep's plan: one record per configuration of the grid, each checked before anything
runs (invalid flags, already finished, written by a live process or held by a job), and a
grid in which two configurations would write one folder refused as a whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from lossy_hooks.study.run_control import LOCK_NAME
from lossy_hooks.study.run_io import round_status
from lossy_hooks.study.sweeping.config_state import config_state, record_planned
from lossy_hooks.study.sweeping.grid import expand_grid, flags_for
from lossy_hooks.study.sweeping.launch import run_dir_for
from lossy_hooks.study.sweeping.report import print_outcome

__all__ = ["FolderCollisionError", "check_folders", "plan", "run_outcome"]

# states of a configuration the sweep leaves alone: someone runs it, or it is queued
_BUSY_STATES = ("running", "pending", "unknown")


class FolderCollisionError(ValueError):
    """Two configurations of a sweep would write one run folder."""


def run_outcome(run_dir: Path, rounds: int) -> str:
    """``finished``, ``diverged`` (a round diverged) or ``unfinished`` (a round has not ended)."""
    ended = [round_status(run_dir / f"round{k}") for k in range(rounds)]
    if any(s is None for s in ended):
        return "unfinished"
    return "diverged" if "diverged" in ended else "finished"


def check_folders(records: list[dict[str, Any]]) -> None:
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


def _records(fixed: dict[str, Any], grid: dict[str, list[Any]], world: int) -> list[dict[str, Any]]:
    """One record per configuration: its settings, flags, rounds, folder (``None`` and
    ``"error"`` for invalid flags)."""
    records = []
    for i, combo in enumerate(expand_grid(grid) or [{}]):
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
    return records


def plan(
    fixed: dict[str, Any], grid: dict[str, list[Any]], world: int, console: Console
) -> list[dict[str, Any]]:
    """One record per configuration of the grid, each checked before anything runs:
    ``"outcome"`` already set for an invalid, finished or busy one, absent for one to run.
    Two configurations that name one folder: ``FolderCollisionError``, nothing done."""
    records = _records(fixed, grid, world)
    check_folders(records)
    for record in records:
        error = record.pop("error")
        run_dir = Path(record["run_dir"]) if record["run_dir"] else None
        if run_dir is None:
            record["outcome"] = f"invalid flags ({error})"
        elif (done := run_outcome(run_dir, record["rounds"])) in ("finished", "diverged"):
            record["outcome"] = f"skipped ({done})"
        else:
            state = config_state(run_dir, record["rounds"])
            if state.state in _BUSY_STATES:
                job = f", job {state.job_id}" if state.job_id else ""
                record["outcome"] = f"skipped ({state.state}{job})"
            elif state.stale_lock:  # left on another host by a job the scheduler says has ended
                (run_dir / LOCK_NAME).unlink(missing_ok=True)
        if "outcome" in record:
            print_outcome(record, len(records), [], console)
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

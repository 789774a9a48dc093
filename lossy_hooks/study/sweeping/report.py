"""What a sweep prints about each configuration as it goes: its outcome line and, for a run
that failed, the last lines of its log and the log's path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from lossy_hooks.study.sweeping.config_state import failure_excerpt

__all__ = ["print_log_tail", "print_outcome", "report_failure"]


def report_failure(record: dict[str, Any], log: Path | None) -> list[str]:
    """Put why a run failed into its record (``"why"``; ``"log"``, its path or ``None`` when
    there is none) and return the log's last lines."""
    if log is None or not log.exists():
        record["why"], record["log"] = "no log found", None
        return []
    excerpt, record["why"] = failure_excerpt(log)
    record["log"] = str(log)
    return excerpt


def print_log_tail(lines: list[str] | tuple[str, ...], log: str | None, console: Console) -> None:
    """A failed run's log: its last ``lines``, indented, then its path."""
    if log is None:
        console.print("    (no log found)", markup=False)
        return
    console.print("\n".join(f"    {ln}" for ln in lines), markup=False, highlight=False)
    console.print(f"    (the whole output: {log})", markup=False, highlight=False)


def print_outcome(record: dict[str, Any], total: int, excerpt: list[str], console: Console) -> None:
    """``[i/total] label: outcome``, then a failed run's log tail (:func:`print_log_tail`)."""
    console.print(f"[{record['index'] + 1}/{total}] {record['label']}: {record['outcome']}", markup=False)
    if "why" in record:
        print_log_tail(excerpt, record["log"], console)

"""Progress output on rank 0: a rich progress bar and an end-of-epoch table on a terminal,
plain lines otherwise (logs, CI, pipes)."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

__all__ = ["Reporter"]


class Reporter:
    """Prints only where ``enabled`` (rank 0). ``fancy`` defaults to stdout being a terminal."""

    def __init__(self, enabled: bool, fancy: bool | None = None) -> None:
        self.enabled = enabled
        self.fancy = sys.stdout.isatty() if fancy is None else fancy
        self.console = Console(highlight=False)
        self._progress: Progress | None = None
        self._task: Any = None
        self._total = 0
        self._next_line = 0.0
        self._t0 = 0.0
        self._label = ""

    def print(self, message: str) -> None:
        if self.enabled:
            if self.fancy:
                self.console.print(message)
            else:
                print(message, flush=True)

    def start_epoch(self, label: str, total_batches: int) -> None:
        if not self.enabled:
            return
        self._total, self._label, self._t0 = total_batches, label, time.perf_counter()
        self._next_line = 0.25
        if self.fancy:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(label, total=total_batches, info="")

    def update(self, done: int, images: int, loss: float, loss_rate: float) -> None:
        if not self.enabled:
            return
        rate = images / max(time.perf_counter() - self._t0, 1e-9)
        info = f"loss {loss:.4f}  lost {100 * loss_rate:.2f}%  {rate:.0f} img/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=done, info=info)
        elif done >= self._next_line * self._total:
            print(f"{self._label}  batch {done}/{self._total}  {info}", flush=True)
            self._next_line += 0.25

    def end_epoch(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        shown = {
            "epoch": row["epoch"],
            "train loss": row["train_loss"],
            "train acc": row["train_acc"],
            "val loss": row.get("val_loss"),
            "val acc": row.get("val_acc"),
            "lost": row["effective_loss_rate"],
            "s": row["epoch_seconds"],
            "img/s": row["images_per_s"],
            "status": row["status"],
        }
        cells = {k: _cell(v, pct=k in ("train acc", "val acc", "lost")) for k, v in shown.items()}
        if self.fancy:
            table = Table(title=self._label, title_justify="left")
            for k in cells:
                table.add_column(k, justify="right")
            table.add_row(*cells.values())
            self.console.print(table)
        else:
            print(f"{self._label}  " + "  ".join(f"{k}={v}" for k, v in cells.items()), flush=True)


def _cell(v: Any, pct: bool = False) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.2f}%" if pct else f"{v:.4g}"
    return str(v)

"""Plots of runs: per-round curves and the mean +/- std summary over rounds."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_round", "plot_summary", "read_curves"]


def read_curves(metrics_csv: Path) -> dict[str, np.ndarray]:
    with open(metrics_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))

    def col(name: str) -> np.ndarray:
        out = []
        for r in rows:
            try:
                out.append(float(r[name]))
            except (TypeError, ValueError):
                out.append(math.nan)
        return np.asarray(out, dtype=np.float64)

    return {k: col(k) for k in ("epoch", "train_loss", "val_loss", "train_acc", "val_acc")}


def _axes(title: str):
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    fig.suptitle(title, fontsize=10)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    return fig, ax_loss, ax_acc


def plot_round(metrics_csv: Path, out_png: Path, title: str) -> None:
    """Loss and accuracy curves (train and validation) of one round."""
    c = read_curves(metrics_csv)
    fig, ax_loss, ax_acc = _axes(title)
    ax_loss.plot(c["epoch"], c["train_loss"], "o-", label="train")
    ax_loss.plot(c["epoch"], c["val_loss"], "s--", label="validation")
    ax_acc.plot(c["epoch"], 100 * c["train_acc"], "o-", label="train")
    ax_acc.plot(c["epoch"], 100 * c["val_acc"], "s--", label="validation")
    for ax in (ax_loss, ax_acc):
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_summary(metric_csvs: list[Path], out_png: Path, title: str) -> None:
    """Mean +/- std over rounds of the loss and accuracy curves (epochs aligned by number)."""
    curves = [read_curves(p) for p in metric_csvs]
    n = max((len(c["epoch"]) for c in curves), default=0)
    fig, ax_loss, ax_acc = _axes(f"{title}  ({len(curves)} rounds, mean ± std)")
    epochs = np.arange(1, n + 1)
    for key, ax, scale, style in (
        ("train_loss", ax_loss, 1, "o-"),
        ("val_loss", ax_loss, 1, "s--"),
        ("train_acc", ax_acc, 100, "o-"),
        ("val_acc", ax_acc, 100, "s--"),
    ):
        grid = np.full((len(curves), n), np.nan)
        for i, c in enumerate(curves):
            grid[i, : len(c[key])] = c[key] * scale
        with np.errstate(invalid="ignore"), _quiet():
            mean, std = np.nanmean(grid, 0), np.nanstd(grid, 0)
        label = key.replace("_", " ").replace("val", "validation")
        ax.plot(epochs, mean, style, label=label)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    for ax in (ax_loss, ax_acc):
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


class _quiet:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)

"""Plots of runs: per-round curves and the mean +/- std summary over rounds. A language
model's runs get a third panel: validation perplexity (log scale)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

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

    keys = ("epoch", "train_loss", "val_loss", "train_acc", "val_acc", "val_perplexity")
    return {k: col(k) for k in keys}


def _has_perplexity(curves: list[dict[str, np.ndarray]]) -> bool:
    return any(np.isfinite(c["val_perplexity"]).any() for c in curves)


def _axes(title: str, perplexity: bool = False):
    panels = 3 if perplexity else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    ax_loss, ax_acc = axes[0], axes[1]
    fig.suptitle(title, fontsize=10)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    accuracy = "token accuracy (%)" if perplexity else "accuracy (%)"
    ax_acc.set(xlabel="epoch", ylabel=accuracy, title="Accuracy")
    ax_ppl = None
    if perplexity:
        ax_ppl = axes[2]
        ax_ppl.set(xlabel="epoch", ylabel="validation perplexity", title="Perplexity", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, ax_loss, ax_acc, ax_ppl


def plot_round(metrics_csv: Path, out_png: Path, title: str) -> None:
    """Loss and accuracy curves (train and validation) of one round."""
    c = read_curves(metrics_csv)
    fig, ax_loss, ax_acc, ax_ppl = _axes(title, _has_perplexity([c]))
    ax_loss.plot(c["epoch"], c["train_loss"], "o-", label="train")
    ax_loss.plot(c["epoch"], c["val_loss"], "s--", label="validation")
    ax_acc.plot(c["epoch"], 100 * c["train_acc"], "o-", label="train")
    ax_acc.plot(c["epoch"], 100 * c["val_acc"], "s--", label="validation")
    if ax_ppl is not None:
        ax_ppl.plot(c["epoch"], c["val_perplexity"], "s--", color="C1", label="validation")
    _save(fig, (ax_loss, ax_acc, ax_ppl), out_png)


def plot_summary(metric_csvs: list[Path], out_png: Path, title: str) -> None:
    """Mean +/- std over rounds of the loss and accuracy curves (epochs aligned by number)."""
    curves = [read_curves(p) for p in metric_csvs]
    n = max((len(c["epoch"]) for c in curves), default=0)
    fig, ax_loss, ax_acc, ax_ppl = _axes(
        f"{title}  ({len(curves)} rounds, mean ± std)", _has_perplexity(curves)
    )
    epochs = np.arange(1, n + 1)
    panels = [
        ("train_loss", ax_loss, 1, "o-"),
        ("val_loss", ax_loss, 1, "s--"),
        ("train_acc", ax_acc, 100, "o-"),
        ("val_acc", ax_acc, 100, "s--"),
    ]
    if ax_ppl is not None:
        panels.append(("val_perplexity", ax_ppl, 1, "s--"))
    for key, ax, scale, style in panels:
        grid = np.full((len(curves), n), np.nan)
        for i, c in enumerate(curves):
            grid[i, : len(c[key])] = c[key] * scale
        with np.errstate(invalid="ignore"), _quiet():
            mean, std = np.nanmean(grid, 0), np.nanstd(grid, 0)
        label = key.replace("_", " ").replace("val", "validation")
        ax.plot(epochs, mean, style, label=label)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    _save(fig, (ax_loss, ax_acc, ax_ppl), out_png)


class _quiet:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _save(fig: Any, axes: tuple[Any, ...], out_png: Path) -> None:
    """Legends on the panels that exist, then the figure written to ``out_png`` and closed."""
    for ax in axes:
        if ax is not None:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)

"""A round's metrics as a TensorBoard run (``--tensorboard``): rank 0 writes, at the end of each
epoch (never on the hot path), what it has just appended to metrics.csv and buckets.csv, so
``tensorboard --logdir runs/`` shows every configuration and round of a sweep side by side.

Where a round's run is::

    --tensorboard          <output_dir>/<config name>/tensorboard/round{k}
    --tensorboard DIR      DIR/<config name>/round{k}

Tags (step = the epoch, 1-based as in metrics.csv), one rule in :func:`epoch_scalars`:

    loss_rate/<point>            packets lost / packets sent in the epoch at drop point
                                 ``worker``, ``post`` (or ``gather``, FSDP's all-gather), or
                                 of a traffic type (``tp``, ``pp``, ``ep``: model parallelism's
                                 collectives), or ``moe_capacity`` (an MoE's capacity drops)
    loss_rate/effective          all drop points together (metrics.csv effective_loss_rate)
    loss_rate/delivered_fraction on a per-hop placement: contributions that reached their root
    bucket_loss/<point>/<b>      bucket b's loss rate in the epoch (buckets.csv)
    link_loss/<phase>/<s->d>     a per-hop placement's link s->d in phase reduce / broadcast
    traffic_loss/<type>/<kind>   a traffic type's loss rate per collective kind (``tp/all_reduce``,
                                 ``pp/p2p``, ``ep/all_to_all``; buckets.csv's traffic rows)
    fidelity/cosine, fidelity/rel_l2, drift/max, drift/mean   where measured
    metrics/<column>             every other numeric metrics.csv column (train_loss, val_acc, ...)

A resumed round continues its run: the writer's ``purge_step`` (the first epoch it will write)
makes TensorBoard drop what an interrupted process wrote for that epoch and later, so every
epoch shows once, with the values of metrics.csv.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

from lossy_hooks.core.placement import Phase
from lossy_hooks.study.extras import require
from lossy_hooks.study.traffic import TRAFFIC_KINDS

__all__ = ["TensorBoardLog", "check_available", "epoch_scalars", "round_log_dir"]

_PHASES = typing.get_args(Phase)
# metrics.csv columns shown under their own group: column -> tag
_GROUPED = {
    "effective_loss_rate": "loss_rate/effective",
    **{f"{t}_loss_rate": f"loss_rate/{t}" for t in TRAFFIC_KINDS},  # as its packet columns give it
    "moe_drop_rate": "loss_rate/moe_capacity",  # token-slots, beside the ep packets
    "delivered_fraction": "loss_rate/delivered_fraction",
    "fidelity_cosine": "fidelity/cosine",
    "fidelity_rel_l2": "fidelity/rel_l2",
    "drift_max": "drift/max",
    "drift_mean": "drift/mean",
}
_NOT_SCALARS = {"epoch", "status"}


def check_available() -> None:
    """Raise :class:`~lossy_hooks.study.extras.MissingExtraError` unless ``torch.utils.tensorboard``
    can write (the ``tensorboard`` extra)."""
    require("tensorboard")
    require("tensorboard", "torch.utils.tensorboard")


def round_log_dir(tensorboard: str, run_dir: Path, k: int) -> Path:
    """Round ``k``'s TensorBoard run: under the configuration folder for ``tensorboard == ""``
    (the flag alone), else ``<tensorboard>/<config name>/round{k}``."""
    if tensorboard == "":
        return run_dir / "tensorboard" / f"round{k}"
    return Path(tensorboard) / run_dir.name / f"round{k}"


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def epoch_scalars(row: dict[str, Any], bucket_rows: list[dict[str, Any]]) -> dict[str, float]:
    """The scalars of one epoch: its metrics.csv ``row`` and buckets.csv ``bucket_rows`` as
    ``{tag: value}`` (the tags of the module docstring). Empty cells are left out; a NaN
    (a diverged round) is kept."""
    out: dict[str, float] = {}
    points = {c[: -len("_packets_sent")] for c in row if c.endswith("_packets_sent")}
    for point in sorted(points):
        sent, lost = _number(row.get(f"{point}_packets_sent")), _number(row.get(f"{point}_packets_lost"))
        if sent and lost is not None:
            out[f"loss_rate/{point}"] = lost / sent
    for column, value in row.items():
        number = _number(value)
        if column in _NOT_SCALARS or number is None:
            continue
        out[_GROUPED.get(column, f"metrics/{column}")] = number
    for b in bucket_rows:
        rate = _number(b.get("loss_rate"))
        if rate is None:
            continue
        traffic = b["drop_point"] in TRAFFIC_KINDS
        group = "link_loss" if b["drop_point"] in _PHASES else "traffic_loss" if traffic else "bucket_loss"
        out[f"{group}/{b['drop_point']}/{b['bucket']}"] = rate
    return out


class TensorBoardLog:
    """Round ``k``'s TensorBoard run (rank 0 only): :meth:`write_epoch` after each epoch's rows
    are appended, :meth:`close` when the round ends. ``first_epoch`` is the first epoch this
    process writes (1 for a fresh round, e+1 for one resumed after epoch e): TensorBoard
    purges anything an earlier process wrote from that epoch on."""

    def __init__(self, log_dir: Path, first_epoch: int, config: dict[str, Any] | None = None) -> None:
        tensorboard = require("tensorboard", "torch.utils.tensorboard")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.writer = tensorboard.SummaryWriter(str(log_dir), purge_step=first_epoch)
        if config is not None and first_epoch == 1:
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
            self.writer.add_text("config", f"```\n{text}\n```", 0)

    def write_epoch(self, row: dict[str, Any], bucket_rows: list[dict[str, Any]]) -> None:
        """Every scalar of the epoch ``row["epoch"]``, flushed to disk (a kill loses nothing written)."""
        step = int(row["epoch"])
        for tag, value in epoch_scalars(row, bucket_rows).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

"""Files of a study run: the configuration folder, metrics.csv, checkpoints, summaries.

Layout::

    <output_dir>/<config name>/config.json
    <output_dir>/<config name>/round{k}/metrics.csv      one row per finished epoch, fsynced
    <output_dir>/<config name>/round{k}/checkpoint.pt    last finished epoch (atomic replace)
    <output_dir>/<config name>/round{k}/final.pt         the round's final model
    <output_dir>/<config name>/round{k}/status.json      {"status": "finished" | "diverged", ...}
    <output_dir>/<config name>/summary.csv, summary.png  after all rounds
    <output_dir>/<config name>/.lock                     host and PID of the writing process
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from lossy_hooks.core.netclock import PHASE_CLOCK_FIELDS
from lossy_hooks.core.statistics import mean_std
from lossy_hooks.study.traffic import TRAFFIC_KINDS

__all__ = [
    "BUCKET_FIELDS",
    "LAYER_FIELDS",
    "METRIC_FIELDS",
    "MetricsLog",
    "atomic_save",
    "packet_rows",
    "parse_float",
    "read_json",
    "round_status",
    "run_loss_rate",
    "sim_clock_column",
    "time_to_target",
    "to_cpu",
    "write_json",
    "write_summary",
]

# per drop point, with FEC, retransmission or protection (PacketLedger.stats)
PROTECTION_COLUMNS = (
    "bytes_sent",
    "extra_packets",
    "extra_bytes",
    "recovered_fec",
    "recovered_retransmit",
    "recovered_protect",
    "protected_packets",
)
METRIC_FIELDS = [
    "epoch",
    "steps",
    "train_loss",
    "val_loss",
    "train_acc",
    "val_acc",
    "val_perplexity",
    "worker_packets_sent",
    "worker_packets_lost",
    "post_packets_sent",
    "post_packets_lost",
    "effective_loss_rate",
    "delivered_fraction",
    "gather_packets_sent",
    "gather_packets_lost",
    *(f"{t}_{f}" for t in TRAFFIC_KINDS for f in ("packets_sent", "packets_lost", "loss_rate")),
    "moe_dropped_slots",
    "moe_routed_slots",
    "moe_drop_rate",
    "sim_lossfree_s",
    "sim_comm_s",
    "sim_reliable_s",
    "sim_comm_per_step_s",
    *PHASE_CLOCK_FIELDS,
    *(f"{p}_{f}" for p in ("worker", "post") for f in PROTECTION_COLUMNS),
    "fidelity_cosine",
    "fidelity_rel_l2",
    "drift_max",
    "drift_mean",
    "skipped_steps",
    "epoch_seconds",
    "images_per_s",
    "status",
]


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``:
    a kill leaves either the old checkpoint or the new one, never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


BUCKET_FIELDS = [
    "epoch",
    "drop_point",
    "bucket",
    "generation",
    "numel",
    "packets",
    "params",
    "first_param",
    "last_param",
    "packets_sent",
    "packets_lost",
    "loss_rate",
]
LAYER_FIELDS = ["epoch", "drop_point", "parameter", "elements", "packets_sent", "packets_lost", "loss_rate"]


class MetricsLog:
    """A per-round CSV with an ``epoch`` column (``metrics.csv``, ``buckets.csv``,
    ``layers.csv``): rows appended and fsynced as each epoch ends."""

    def __init__(self, path: Path, fields: list[str] = METRIC_FIELDS) -> None:
        self.path = path
        self.fields = fields
        if not path.exists():
            with open(path, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(fields)
        else:
            with open(path, newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), [])
            if header != fields:  # written by an older version: rewrite with today's columns
                self._rewrite([{k: v for k, v in r.items() if k in fields} for r in self.rows()])

    def rows(self) -> list[dict[str, str]]:
        with open(self.path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def truncate_after(self, epoch: int) -> None:
        """Keep only rows of epochs <= ``epoch`` (a row written after the last checkpoint
        is recomputed on resume, so it must not stay twice)."""
        self._rewrite([r for r in self.rows() if int(r["epoch"]) <= epoch])

    def _rewrite(self, kept: list[dict[str, str]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, self.fields)
            w.writeheader()
            w.writerows(kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def append(self, *rows: dict[str, Any]) -> None:
        for row in rows:
            unknown = set(row) - set(self.fields)
            if unknown:
                raise KeyError(f"unknown fields {sorted(unknown)} for {self.path.name}")
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, self.fields)
            for row in rows:
                w.writerow({k: _fmt(row.get(k)) for k in self.fields})
            fh.flush()
            os.fsync(fh.fileno())


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return v


def round_status(round_dir: Path) -> str | None:
    """``"finished"``/``"diverged"`` for an ended round, else None."""
    path = round_dir / "status.json"
    return read_json(path)["status"] if path.exists() else None


def parse_float(x: str | None) -> float:
    """A CSV cell as a float; NaN for an empty or non-numeric cell."""
    try:
        return float(x) if x not in (None, "") else math.nan
    except (TypeError, ValueError):
        return math.nan


def run_loss_rate(rows: list[dict[str, str]]) -> float:
    """The whole round's measured loss rate from its metrics.csv rows: packets lost over
    packets sent, summed over every epoch and both drop points (not the last epoch's rate)."""
    sent = lost = 0.0
    for r in rows:
        for point in ("worker", "post"):
            s, lo = (
                parse_float(r.get(f"{point}_packets_sent", "")),
                parse_float(r.get(f"{point}_packets_lost", "")),
            )
            if not math.isnan(s) and not math.isnan(lo):
                sent, lost = sent + s, lost + lo
    return lost / sent if sent else math.nan


def sim_clock_column(cfg: dict[str, Any]) -> str | None:
    """The metrics.csv column that prices a run's communication on the simulated clock: the
    deadline transport's for a ``deadline`` loss model, else the reliable transport's (the
    run lost nothing to timing); ``None`` without a simulated network."""
    if cfg.get("bandwidth_gbps") is None:
        return None
    return "sim_comm_s" if str(cfg.get("loss_model", "")).startswith("deadline") else "sim_reliable_s"


def time_to_target(rows: list[dict[str, str]], target: float, clock: str | None = None) -> float:
    """Seconds until the first epoch whose validation accuracy reaches ``target``: measured
    epoch seconds, plus the simulated communication of ``clock`` when given (NaN if never)."""
    total = 0.0
    for r in rows:
        total += parse_float(r.get("epoch_seconds")) + (parse_float(r.get(clock)) if clock else 0.0)
        if parse_float(r.get("val_acc")) >= target:
            return total
    return math.nan


def write_summary(
    run_dir: Path, rounds: int, target_acc: float | None = None, clock: str | None = None
) -> list[dict[str, Any]]:
    """``summary.csv``: per round its final and best validation accuracy (and, for a
    language model, final and lowest validation perplexity), status and the whole round's
    measured loss rate, then mean and std over rounds. With a simulated network (``clock``:
    :func:`sim_clock_column`) the round's simulated time (measured epoch seconds plus the
    simulated communication); with ``target_acc`` the time to reach it, measured and
    simulated."""
    rows = []
    for k in range(rounds):
        rd = run_dir / f"round{k}"
        if not (rd / "metrics.csv").exists():
            continue
        metrics = MetricsLog(rd / "metrics.csv").rows()
        accs = [parse_float(r["val_acc"]) for r in metrics]
        accs = [a for a in accs if not math.isnan(a)]
        ppl = [parse_float(r.get("val_perplexity")) for r in metrics]
        ppl = [x for x in ppl if not math.isnan(x)]
        row = {
            "round": k,
            "status": round_status(rd) or "unfinished",
            "epochs": len(metrics),
            "final_val_acc": accs[-1] if accs else math.nan,
            "best_val_acc": max(accs) if accs else math.nan,
            "final_train_loss": parse_float(metrics[-1]["train_loss"]) if metrics else math.nan,
            "effective_loss_rate": run_loss_rate(metrics),
        }
        if ppl:  # a language model
            row |= {"final_val_perplexity": ppl[-1], "best_val_perplexity": min(ppl)}
        if clock:
            row["sim_time_s"] = sum(
                parse_float(r.get("epoch_seconds")) + parse_float(r.get(clock)) for r in metrics
            )
        if target_acc is not None:
            row["time_to_target_s"] = time_to_target(metrics, target_acc)
            if clock:
                row["sim_time_to_target_s"] = time_to_target(metrics, target_acc, clock)
        rows.append(row)
    fields = [
        "round",
        "status",
        "epochs",
        "final_val_acc",
        "best_val_acc",
        "final_train_loss",
        "effective_loss_rate",
    ]
    for extra in (
        ("final_val_perplexity", "best_val_perplexity"),
        ("sim_time_s",),
        ("time_to_target_s",),
        ("sim_time_to_target_s",),
    ):
        if any(extra[0] in r for r in rows):
            fields += list(extra)
    with open(run_dir / "summary.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in fields})
        for label, idx in (("mean", 0), ("std", 1)):
            agg = {f: _fmt(mean_std([r.get(f, math.nan) for r in rows])[idx]) for f in fields[3:]}
            w.writerow({"round": label, "status": "", "epochs": "", **agg})
    return rows


def packet_rows(counts: dict[str, Any], epoch: int) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """What :meth:`~lossy_hooks.core.ledger.PacketLedger.since_mark` counted in an epoch, as
    metrics.csv's packet columns (``<point>_packets_sent``, ``<point>_packets_lost``,
    ``effective_loss_rate``: lost over sent, all drop points together; on a per-hop placement
    ``delivered_fraction``, the contributions that reached their chunk's root) and the rows of
    buckets.csv (``BUCKET_FIELDS``; a per-hop placement adds one row per phase and link:
    ``drop_point`` = ``reduce`` / ``broadcast``, ``bucket`` = ``src->dst``, ``packets_sent`` =
    packets it carried) and layers.csv (``LAYER_FIELDS``)."""
    columns: dict[str, Any] = {}
    for point, figures in counts["points"].items():
        columns[f"{point}_packets_sent"], columns[f"{point}_packets_lost"] = (
            figures["packets_sent"],
            figures["packets_lost"],
        )
        columns |= {f"{point}_{f}": figures[f] for f in PROTECTION_COLUMNS if f in figures}
    sent = sum(v["packets_sent"] for v in counts["points"].values())
    lost = sum(v["packets_lost"] for v in counts["points"].values())
    columns["effective_loss_rate"] = lost / sent if sent else 0.0
    worker = counts["points"].get("worker")
    if counts.get("links") and worker is not None and worker["packets_sent"]:  # a per-hop placement
        columns["delivered_fraction"] = 1.0 - worker["packets_lost"] / worker["packets_sent"]
    buckets = [
        {"epoch": epoch, "drop_point": b["drop_point"], "bucket": b["index"]}
        | {k: b[k] for k in ("generation", "numel", "packets")}
        | {"params": len(b["params"]), "first_param": b["params"][0], "last_param": b["params"][-1]}
        | {k: b[k] for k in ("packets_sent", "packets_lost", "loss_rate")}
        for b in counts["buckets"]
    ]
    buckets += [  # a per-hop placement's links: drop_point = the phase, bucket = "src->dst"
        {"epoch": epoch, "drop_point": r["phase"], "bucket": r["link"], "packets_sent": r["packets_carried"]}
        | {k: r[k] for k in ("packets_lost", "loss_rate")}
        for r in counts.get("links", [])
    ]
    return columns, buckets, [{"epoch": epoch} | r for r in counts["parameters"]]


def to_cpu(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor moved to the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj

"""What the language-model studies share (:mod:`lossy_hooks.experiments.lm_study`,
:mod:`lossy_hooks.experiments.traffic_study`): a run's final validation perplexity per round
and its measured loss over chosen packet counters, and the change against a lossless run
paired by seed."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from lossy_hooks.core.statistics import mean_std
from lossy_hooks.study.run_io import parse_float

__all__ = ["final_perplexities", "paired_change"]


def final_perplexities(
    run_dir: Path, rounds: int, points: tuple[str, ...] = ("worker", "post", "gather")
) -> tuple[list[float], float]:
    """Final validation perplexity of each round that has one, and the measured loss over
    the whole run: packets lost over packets sent, summed over every epoch, round and
    metrics.csv counter ``<point>_packets_sent`` / ``<point>_packets_lost`` of ``points``
    (``worker``, ``post``: the gradient collective; ``gather``: FSDP's all-gather; ``tp``,
    ``pp``, ``ep``: a traffic type's group); NaN when none of them counted a packet."""
    ppl, sent, lost = [], 0, 0
    for k in range(rounds):
        path = run_dir / f"round{k}" / "metrics.csv"
        if not path.exists():
            continue
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        values = [parse_float(r.get("val_perplexity")) for r in rows]
        values = [v for v in values if not math.isnan(v)]
        if values:
            ppl.append(values[-1])
        for r in rows:
            for point in points:
                s, lo = (
                    parse_float(r.get(f"{point}_packets_sent")),
                    parse_float(r.get(f"{point}_packets_lost")),
                )
                if not math.isnan(s) and not math.isnan(lo):
                    sent, lost = sent + int(s), lost + int(lo)
    return ppl, lost / sent if sent else math.nan


def paired_change(values: list[float], lossless: list[float]) -> tuple[float, float]:
    """``(ppl - ppl_0) / ppl_0`` paired by seed (round ``k`` with the lossless round ``k``),
    its mean and sample std over the pairs (NaN without a pair)."""
    return mean_std([p / b - 1.0 for p, b in zip(values, lossless, strict=False) if b > 0])

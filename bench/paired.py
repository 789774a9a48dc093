"""The benchmarks' one summary of timings against a reference, paired by repetition."""

from __future__ import annotations

import statistics

__all__ = ["paired_ratios"]


def paired_ratios(seconds: list[float], base: list[float]) -> dict[str, float]:
    """``seconds[i]`` against the reference's ``base[i]`` of the same repetition: the ratio of
    the medians, and the median and quartiles of the per-repetition ratios (robust to the
    machine's drifts between repetitions)."""
    ratios = sorted(s / b for s, b in zip(seconds, base, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "ratio_of_medians": statistics.median(seconds) / statistics.median(base),
        "paired_ratio_median": statistics.median(ratios),
        "paired_ratio_q1": q[0],
        "paired_ratio_q3": q[2],
    }

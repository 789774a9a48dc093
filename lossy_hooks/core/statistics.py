"""Statistics for checking and summarising loss processes and runs.

- :func:`binomial_interval`: the central interval holding ``confidence`` of the
  Binomial(n, p) mass: where an i.i.d. loss count must fall.
- :func:`markov_loss_interval`: the same for a Markov-modulated loss process, from the
  chain's asymptotic variance (losses are correlated, so the binomial one is too narrow).
- :func:`burst_lengths`: lengths of runs of consecutive losses in a mask.
- :func:`mean_std`: mean and sample standard deviation over rounds.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import torch

__all__ = [
    "binomial_interval",
    "burst_lengths",
    "markov_asymptotic_variance",
    "markov_loss_interval",
    "mean_std",
]


def binomial_interval(n: int, p: float, confidence: float = 0.999) -> tuple[int, int]:
    """``(lo, hi)`` such that ``P(lo <= X <= hi) >= confidence`` for ``X ~ Binomial(n, p)``,
    with at most ``(1 - confidence)/2`` of the mass cut from each side. Exact (log-pmf via
    ``lgamma`` in float64)."""
    if n <= 0 or p <= 0.0:
        return 0, 0
    if p >= 1.0:
        return n, n
    k = torch.arange(n + 1, dtype=torch.float64)
    logpmf = (
        math.lgamma(n + 1)
        - torch.lgamma(k + 1)
        - torch.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )
    cdf = torch.cumsum(torch.exp(logpmf), 0)
    tail = (1.0 - confidence) / 2.0
    lo = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
    hi = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
    return lo, min(hi, n)


def markov_asymptotic_variance(transition: np.ndarray, emission: np.ndarray) -> tuple[float, float]:
    """``(mean, sigma2)`` of the loss indicator of a Markov-modulated Bernoulli process.

    Packet ``i`` is lost with probability ``h[S_i]``, ``S`` a chain with transition matrix
    ``P`` and stationary ``pi``. Then ``sqrt(n) (mean loss - pi.h)`` tends to
    ``N(0, sigma2)`` with ``sigma2 = sum_s pi_s h_s (1 - h_s) + hbar' D (2Z - I) hbar``,
    where ``hbar = h - pi.h``, ``D = diag(pi)``, ``Z = (I - P + 1 pi')^-1`` (the fundamental
    matrix). Assumes an irreducible chain.
    """
    p = np.asarray(transition, dtype=np.float64)
    h = np.asarray(emission, dtype=np.float64)
    k = len(p)
    a = np.vstack([(p.T - np.eye(k)), np.ones(k)])
    b = np.zeros(k + 1)
    b[-1] = 1.0
    pi = np.linalg.lstsq(a, b, rcond=None)[0]
    mean = float(pi @ h)
    hbar = h - mean
    z = np.linalg.inv(np.eye(k) - p + np.outer(np.ones(k), pi))
    chain = float(hbar @ np.diag(pi) @ (2 * z - np.eye(k)) @ hbar)
    emission_noise = float(pi @ (h * (1 - h)))
    return mean, max(chain + emission_noise, 0.0)


def markov_loss_interval(
    transition: np.ndarray, emission: np.ndarray, n: int, confidence: float = 0.999
) -> tuple[float, float]:
    """Interval for the loss fraction of ``n`` packets of a Markov-modulated process,
    normal approximation with the chain's asymptotic variance."""
    mean, var = markov_asymptotic_variance(transition, emission)
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    half = z * math.sqrt(var / n)
    return mean - half, mean + half


def burst_lengths(lost: torch.Tensor) -> torch.Tensor:
    """Lengths of the maximal runs of ``True`` in a 1-D bool tensor (vectorized)."""
    x = lost.to(torch.int8).flatten()
    edges = torch.diff(torch.cat([x.new_zeros(1), x, x.new_zeros(1)]))
    starts = torch.nonzero(edges == 1).flatten()
    ends = torch.nonzero(edges == -1).flatten()
    return ends - starts


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs are ignored."""
    arr = np.asarray([v for v in values if v == v], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0

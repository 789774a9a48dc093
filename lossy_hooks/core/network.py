r"""The simulated network: how long each collective would take on a network with latency, bandwidth,
heavy-tailed jitter, stragglers and random drops, for a transport that stops at a deadline
(and loses what is late) and for a reliable one (that resends what is dropped and waits).

The model (``W`` ranks; a collective over ``B`` bytes (the bucket's real bytes on the wire) in
``n`` packets, ``b = B / n`` bytes each on average (``mtu`` but for a short last packet);
``alpha`` the per-message latency, ``beta`` the link bandwidth in bytes/s):

- loss-free ring allreduce (``2(W-1)`` steps, each sending ``B/W`` bytes to a neighbour):
  ``T_0 = 2 (W - 1) (alpha + B / (W beta))`` (``0`` for ``W = 1``);
- arrival of rank ``r``'s packet ``j``: ``t_{r,j} = s_r T_0 + X_{r,j}``, with ``s_r = f`` when
  rank ``r`` straggles at this call (probability ``q``, independently per rank and call)
  and ``1`` otherwise, and ``X`` an extra delay, i.i.d. per packet: none; lognormal
  (``X = exp(mu + sigma Z)`` microseconds, ``Z ~ N(0, 1)``); or Pareto (Lomax, type II:
  ``P(X > x) = (1 + x / x_m)^(-a)``, microseconds);
- dropped packets: i.i.d. with probability ``p_0`` (``drop_rate``); a dropped packet never
  arrives;
- the deadline transport (the ``deadline`` loss model) loses a packet that is dropped or
  arrives after ``d`` (``d`` absolute, or ``x T_0``) and closes early (OptiReduce's rule,
  :func:`early_close`): each sender flags its last packet, links deliver in order, so the
  collective ends when every sender's flagged packet is in: ``T_lossy = d`` if a delivered
  packet is late or a sender's last packet is dropped, else ``max`` of the delivered ``t``
  (a dropped packet other than the last is lost without holding the collective; until
  2026-12-04 any drop held it to ``d``). Without a deadline model ``T_lossy = max t``;
- the reliable transport resends a dropped packet after a timeout ``RTO``: a packet whose
  first ``K`` transmissions are dropped (``P(K >= k) = p_0^k``) arrives at
  ``t + K (RTO + b / beta)``; the collective ends at the last arrival,
  ``T_reliable = max_{r,j} (t_{r,j} + K_{r,j} (RTO + b / beta))``.

At world size 1 nothing crosses the network: no time, no loss.

The clock that draws these times per collective, on every rank alike, is
:class:`~lossy_hooks.core.netclock.SimClock`; it prices ``algorithm="ps"`` as above (one
traversal around an opaque ring allreduce) and a per-hop placement step by step.

Per-packet loss probability of the deadline transport (what its counters converge to):
``1 - (1 - p_0) [(1 - q) F(d - T_0) + q F(d - f T_0)]`` with ``F`` the CDF of ``X``
(:meth:`NetworkModel.deadline_loss_probability`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["JITTERS", "NetworkModel", "early_close", "parse_jitter"]

JITTERS = ("none", "lognormal", "pareto")


def parse_jitter(text: str) -> tuple[str, tuple[float, ...]]:
    """``"none"``, ``"lognormal MU SIGMA"`` or ``"pareto XM A"`` -> ``(kind, params)``."""
    parts = text.split()
    if not parts or parts[0] not in JITTERS:
        raise ValueError(f"jitter must be 'none', 'lognormal MU SIGMA' or 'pareto XM A', got {text!r}")
    kind, values = parts[0], parts[1:]
    want = 0 if kind == "none" else 2
    if len(values) != want:
        raise ValueError(f"jitter {kind!r} takes {want} numbers, got {text!r}")
    try:
        params = tuple(float(v) for v in values)
    except ValueError:
        raise ValueError(f"jitter {text!r}: the parameters must be numbers") from None
    if kind == "lognormal" and not (math.isfinite(params[0]) and params[1] > 0 and math.isfinite(params[1])):
        raise ValueError(f"jitter lognormal MU SIGMA needs a finite MU and SIGMA > 0, got {text!r}")
    if kind == "pareto" and not (params[0] > 0 and params[1] > 0 and all(map(math.isfinite, params))):
        raise ValueError(f"jitter pareto XM A needs XM > 0 (microseconds) and A > 0, got {text!r}")
    return kind, params


@dataclass(frozen=True)
class NetworkModel:
    """The simulated network (see the module docs); every argument is checked here."""

    bandwidth_gbps: float = 100.0  # link bandwidth beta, Gbit/s (> 0)
    latency_us: float = 5.0  # per-message latency alpha, microseconds (>= 0)
    jitter: str = "none"  # "none", "lognormal MU SIGMA", "pareto XM A" (microseconds)
    straggler_prob: float = 0.0  # q: a rank straggles at a call with this probability
    straggler_factor: float = 1.0  # f >= 1: a straggler's base time is f T_0
    drop_rate: float = 0.0  # p_0: packets dropped at random, in [0, 1)
    rto_us: float = 1000.0  # the reliable transport's retransmission timeout (> 0)

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(
            self.bandwidth_gbps > 0 and math.isfinite(self.bandwidth_gbps),
            f"bandwidth_gbps must be > 0, got {self.bandwidth_gbps}",
        )
        check(
            self.latency_us >= 0 and math.isfinite(self.latency_us),
            f"latency_us must be >= 0, got {self.latency_us}",
        )
        check(
            0.0 <= self.straggler_prob <= 1.0, f"straggler_prob must be in [0, 1], got {self.straggler_prob}"
        )
        check(
            self.straggler_factor >= 1.0 and math.isfinite(self.straggler_factor),
            f"straggler_factor must be >= 1, got {self.straggler_factor}",
        )
        check(0.0 <= self.drop_rate < 1.0, f"drop_rate must be in [0, 1), got {self.drop_rate}")
        check(self.rto_us > 0 and math.isfinite(self.rto_us), f"rto_us must be > 0, got {self.rto_us}")
        object.__setattr__(self, "_jitter", parse_jitter(self.jitter))  # parsed once

    @property
    def beta(self) -> float:
        """Link bandwidth in bytes per second."""
        return self.bandwidth_gbps * 1e9 / 8

    @property
    def alpha(self) -> float:
        return self.latency_us * 1e-6

    def ring_seconds(self, nbytes: float, world: int) -> float:
        """``T_0 = 2 (W - 1) (alpha + B / (W beta))``: a loss-free ring allreduce of ``B`` bytes."""
        if world <= 1:
            return 0.0
        return 2 * (world - 1) * (self.alpha + nbytes / (world * self.beta))

    def delay_cdf(self, x: float) -> float:
        """``F(x) = P(X <= x)`` of the extra delay ``X`` (seconds)."""
        if x < 0:
            return 0.0
        kind, params = self._jitter  # type: ignore[attr-defined]
        us = x * 1e6
        if kind == "none":
            return 1.0
        if kind == "lognormal":
            mu, sigma = params
            return 0.0 if us == 0 else 0.5 * (1 + math.erf((math.log(us) - mu) / (sigma * math.sqrt(2))))
        xm, a = params
        return 1.0 - (1.0 + us / xm) ** (-a)

    def sample_delays(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Extra delays ``X`` (seconds, float64) of ``shape`` packets, on the generator's device."""
        kind, params = self._jitter  # type: ignore[attr-defined]
        device = generator.device
        if kind == "none":
            return torch.zeros(shape, dtype=torch.float64, device=device)
        if kind == "lognormal":
            z = torch.randn(shape, generator=generator, dtype=torch.float64, device=device)
            return torch.exp(params[0] + params[1] * z) * 1e-6
        u = 1.0 - torch.rand(shape, generator=generator, dtype=torch.float64, device=device)  # (0, 1]
        return params[0] * (u.pow(-1.0 / params[1]) - 1.0) * 1e-6

    def deadline_loss_probability(self, deadline_s: float, t0: float, world: int) -> float:
        """Per-packet loss probability of the deadline transport (module docs) for a collective
        whose loss-free time is ``t0`` (its placement's price, :meth:`SimClock.lossfree_seconds`);
        0 at world size 1, where nothing crosses the network."""
        if world <= 1:
            return 0.0
        q, f = self.straggler_prob, self.straggler_factor
        on_time = (1 - q) * self.delay_cdf(deadline_s - t0) + q * self.delay_cdf(deadline_s - f * t0)
        return 1.0 - (1.0 - self.drop_rate) * on_time

    def expected_max_resends(self, packets: int) -> float:
        """``E[max_j K_j]`` over ``packets`` packets, ``P(K >= k) = p_0^k``:
        ``sum_{k >= 1} (1 - (1 - p_0^k)^N)`` (the reliable transport's tail without jitter)."""
        p, total, k = self.drop_rate, 0.0, 1
        while p > 0:
            term = 1.0 - (1.0 - p**k) ** packets
            total += term
            if term < 1e-15:
                break
            k += 1
        return total


def early_close(
    arrival: torch.Tensor, deadline: torch.Tensor | float, dropped: torch.Tensor | None, valid: torch.Tensor
) -> torch.Tensor:
    r"""When the deadline transport's receiver closes each link (row) of a step: OptiReduce's
    early close, the link is done when its sender's last (flagged) packet is in. Links deliver
    in order, so that packet is the last of the link's delivered ones:

    ``close_h = d`` if a delivered packet of link ``h`` is late (``a_{h,i} > d``) or its last
    packet is dropped (the flag never arrives: the receiver waits out the deadline), else
    ``close_h = max_{i delivered} a_{h,i}`` (``0`` for a link that carries nothing). A dropped
    packet other than the last is lost without holding the step. The step (on ``ps`` the
    collective) ends at ``max_h close_h``: ``d`` if any link holds, else its last delivery.

    ``arrival``, ``valid`` (the slots a link carries, a prefix of each row) and ``dropped``:
    ``(R, S)``; ``deadline``: a scalar or ``(R, 1)``. Returns ``(R,)``, on their device."""
    delivered = valid if dropped is None else valid & ~dropped
    hold = ((arrival > deadline) & delivered).any(1)
    if dropped is not None:
        last = (valid.sum(1) - 1).clamp(min=0)[:, None]
        hold |= dropped.gather(1, last)[:, 0] & valid.any(1)
    close = torch.where(delivered, arrival, 0.0).amax(1)
    d = torch.as_tensor(deadline, dtype=close.dtype, device=close.device)
    return torch.where(hold, d.reshape(-1) if d.dim() else d, close)

r"""Simulated time: how long each collective would take on a network with latency, bandwidth,
heavy-tailed jitter, stragglers and random drops, for a transport that stops at a deadline
(and loses what is late) and for a reliable one (that resends what is dropped and waits).

These machines have no lossy network, so time is simulated on a clock every rank computes
identically (one random stream shared by all ranks, no communication), on the bucket's
device, without host synchronisation; it is read at epoch ends.

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
  arrives after ``d`` (``d`` absolute, or ``x T_0``); the collective ends at ``d`` when any
  packet is lost (the receiver cannot know a packet will not come), else at the last arrival:
  ``T_lossy = d if any lost else max t``. Without a deadline model ``T_lossy = max t``;
- the reliable transport resends a dropped packet after a timeout ``RTO``: a packet whose
  first ``K`` transmissions are dropped (``P(K >= k) = p_0^k``) arrives at
  ``t + K (RTO + b / beta)``; the collective ends at the last arrival,
  ``T_reliable = max_{r,j} (t_{r,j} + K_{r,j} (RTO + b / beta))``.

At world size 1 nothing crosses the network: no time, no loss.

Per-packet loss probability of the deadline transport (what its counters converge to):
``1 - (1 - p_0) [(1 - q) F(d - T_0) + q F(d - f T_0)]`` with ``F`` the CDF of ``X``
(:meth:`NetworkModel.deadline_loss_probability`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from lossy_hooks.core.placement import ParameterServer, Placement
from lossy_hooks.core.streams import derive_seed
from lossy_hooks.loss_models.deadline import Deadline

__all__ = ["JITTERS", "STREAM_CLOCK", "Deadline", "NetworkModel", "SimClock", "parse_jitter"]

JITTERS = ("none", "lognormal", "pareto")
STREAM_CLOCK = 5  # the clock's random stream: derive_seed(seed, 5), the same on every rank


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


# totals: loss-free T_0, the lossy (deadline) transport, the reliable one; and calls
CLOCK_FIELDS = ("sim_lossfree_s", "sim_comm_s", "sim_reliable_s")


class SimClock:
    """The clock of one :class:`~lossy_hooks.LossyState`: per collective call, the arrival
    time of every rank's packets (from a stream shared by all ranks, so every rank computes
    the same clock), the lossy and reliable completion times, summed on the device."""

    def __init__(
        self, network: NetworkModel, deadline: Deadline | None = None, placement: Placement | None = None
    ) -> None:
        self.network = network
        self.deadline = deadline
        self.placement = placement if placement is not None else ParameterServer()
        self.generator: torch.Generator | None = None
        self.totals: torch.Tensor | None = None  # float64 [T_0, T_lossy, T_reliable] sums
        self.lost: torch.Tensor | None = None  # (W, n) packets the deadline transport lost, last call
        self.world = 1
        self.calls = 0
        self.mark = [0.0] * len(CLOCK_FIELDS)
        self._saved: dict[str, Any] | None = None

    def prepare(self, device: torch.device, seed: int, world: int) -> None:
        """At the first bucket: the shared generator (restored from a checkpoint if one was
        loaded), the totals on ``device``."""
        if self.generator is not None and self.generator.device == device:
            return
        self.world = world
        gen = torch.Generator(device=device)
        gen.manual_seed(derive_seed(seed, STREAM_CLOCK))
        totals = torch.zeros(len(CLOCK_FIELDS), dtype=torch.float64, device=device)
        if self._saved is not None:
            saved_on, state = self._saved["generator"]
            if saved_on == device.type:
                gen.set_state(state)
            else:
                warnings.warn(
                    f"the simulated clock's generator was saved on {saved_on!r} and is resumed on "
                    f"{device.type!r}: its random stream restarts from the seed",
                    stacklevel=3,
                )
            totals.copy_(self._saved["totals"])
            self._saved = None
        elif self.totals is not None:
            totals.copy_(self.totals)
        self.generator, self.totals = gen, totals

    def lossfree_seconds(self, nbytes: float) -> float:
        """``T_0`` of one collective of ``nbytes`` bytes at this clock's world size, as its
        placement prices it (:meth:`Placement.lossfree_seconds`)."""
        return self.placement.lossfree_seconds(self.network, nbytes, self.world)

    def tick(self, num_packets: int, nbytes: float, packet_bytes: float) -> None:
        """One collective of ``nbytes`` bytes in ``num_packets`` packets: draw every rank's
        arrivals, add ``T_0``, ``T_lossy`` and ``T_reliable`` to the totals, and keep the
        packets the deadline transport lost (:meth:`lost_row`)."""
        assert self.generator is not None and self.totals is not None
        net, gen, w, n = self.network, self.generator, self.world, num_packets
        dev = gen.device
        self.calls += 1
        if w == 1:  # one rank: nothing crosses the network, nothing takes time or is lost
            self.lost = torch.zeros((1, n), dtype=torch.bool, device=dev)
            return
        t0 = self.lossfree_seconds(nbytes)
        base = torch.full((w, 1), t0, dtype=torch.float64, device=dev)
        if net.straggler_prob > 0:
            slow = torch.rand((w, 1), generator=gen, device=dev) < net.straggler_prob
            base = torch.where(slow, net.straggler_factor * t0, base)
        t = base + net.sample_delays((w, n), gen)
        resend = net.rto_us * 1e-6 + packet_bytes / net.beta
        if net.drop_rate > 0:
            u = 1.0 - torch.rand((w, n), generator=gen, dtype=torch.float64, device=dev)  # (0, 1]
            tries = torch.floor(torch.log(u) / math.log(net.drop_rate))  # K: P(K >= k) = p0^k
            dropped = tries > 0
            reliable = (t + tries * resend).max()
        else:
            dropped = None
            reliable = t.max()
        if self.deadline is not None:
            d = self.deadline.seconds(t0)
            lost = t > d if dropped is None else (t > d) | dropped
            lossy = torch.where(lost.any(), d, t.max())  # a Python scalar: no host-to-device copy
            self.lost = lost
        else:
            lossy = t.max()
        self.totals[0] += t0
        self.totals[1:].add_(torch.stack((lossy, reliable)))

    def lost_row(self, row: int, num_packets: int) -> torch.Tensor:
        """The deadline transport's loss mask of rank ``row``'s packets at the last call."""
        if self.lost is None or self.lost.shape[1] != num_packets:
            raise RuntimeError(
                "the deadline loss model draws from the clock: tick() it for this bucket first"
            )
        return self.lost[row]

    def read(self) -> dict[str, float]:
        """The totals so far (seconds; one host sync), and ``calls``."""
        values = [0.0] * len(CLOCK_FIELDS) if self.totals is None else self.totals.tolist()
        if self.totals is None and self._saved is not None:
            values = self._saved["totals"].tolist()
        return dict(zip(CLOCK_FIELDS, values, strict=True)) | {"calls": self.calls}

    def since_mark(self) -> dict[str, float]:
        """What the clock added since the previous call (an epoch), then a new mark."""
        now = self.read()
        delta = {k: now[k] - m for k, m in zip(CLOCK_FIELDS, self.mark, strict=True)}
        self.mark = [now[k] for k in CLOCK_FIELDS]
        return delta

    def state_dict(self) -> dict[str, Any]:
        if self.generator is not None and self.totals is not None:
            gen = (self.generator.device.type, self.generator.get_state())
            totals = self.totals.detach().cpu()
        elif self._saved is not None:
            gen, totals = self._saved["generator"], self._saved["totals"]
        else:
            gen, totals = None, torch.zeros(len(CLOCK_FIELDS), dtype=torch.float64)
        return {"generator": gen, "totals": totals, "calls": self.calls, "mark": list(self.mark)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.generator, self.totals, self.lost = None, None, None
        self.calls = int(sd["calls"])
        self.mark = [float(x) for x in sd["mark"]]
        gen, totals = sd["generator"], sd["totals"].detach().cpu().double()
        if gen is None:  # saved before the first collective: nothing drawn yet
            self._saved = None
        else:  # Generator.set_state takes a CPU ByteTensor (a map_location may have moved it)
            self._saved = {"generator": (str(gen[0]), gen[1].detach().cpu()), "totals": totals}

r"""Simulated time: the clock of one hook state, which draws how long each collective takes
on the simulated network (:mod:`lossy_hooks.core.network`: latency, bandwidth, heavy-tailed
jitter, stragglers, random drops; the deadline and the reliable transports and their rules)
and which packets the deadline transport loses.

These machines have no lossy network, so time is simulated on a clock every rank computes
identically (one random stream shared by all ranks, no communication), on the bucket's
device, without host synchronisation; it is read at epoch ends.

``algorithm="ps"`` is priced as :mod:`lossy_hooks.core.network` says (one traversal around
an opaque ring allreduce). A per-hop placement (ring, tree, dbtree, direct) is priced step by
step on the links its schedule uses (:class:`SimClock`; the steps and each hop's loss-free
duration in :mod:`lossy_hooks.core.placement.timing`), with per-step deadlines, so the
deadline transport loses a packet on the hop where it is late. The deadline is fixed
(:class:`Deadline`) or set per collective from the earlier ones' completion times
(:class:`AdaptiveDeadline`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from lossy_hooks.core.network import NetworkModel, early_close
from lossy_hooks.core.placement import HopPlacement, ParameterServer, Phase, Placement
from lossy_hooks.core.placement.timing import PhaseTiming
from lossy_hooks.core.streams import Stream, derive_seed
from lossy_hooks.loss_models.deadline import AdaptiveDeadline, Deadline

__all__ = ["CLOCK_FIELDS", "PHASE_CLOCK_FIELDS", "SimClock"]

# totals: loss-free T_0, the lossy (deadline) transport, the reliable one; then per phase
CLOCK_FIELDS = ("sim_lossfree_s", "sim_comm_s", "sim_reliable_s")
PHASE_CLOCK_FIELDS = tuple(
    f"sim_{kind}_{phase}_s" for phase in ("reduce", "broadcast") for kind in ("lossfree", "comm", "reliable")
)
_ALL_FIELDS = CLOCK_FIELDS + PHASE_CLOCK_FIELDS


class SimClock:
    """The clock of one :class:`~lossy_hooks.LossyState`: per collective call, the arrival
    time of every packet (from a stream shared by all ranks, so every rank computes the same
    clock), the lossy and reliable completion times, summed on the device.

    ``algorithm="ps"`` is priced as :mod:`lossy_hooks.core.network` says (one traversal,
    ``T_0`` the ring). A per-hop placement is priced step by step
    (:mod:`lossy_hooks.core.placement.timing`: store and forward, ports shared fairly), each
    phase on its own:

    * hop ``h`` at step ``t`` (loss-free duration ``D_h``): its packet ``i`` arrives
      ``a_{h,i} = sigma_{src(h)} D_h + X_{h,i}`` after the step starts, ``sigma = f`` for a
      sender that straggles at this call (every link it sends on, both phases), ``X`` the
      jitter i.i.d. per packet and hop; a packet the network drops (``p_0``) never arrives;
    * step ``t`` of the reliable transport ends at ``max_{h,i} (a_{h,i} + K_{h,i} (RTO +
      b/beta))``; of the deadline transport at ``d_t = x tau0_t`` if a packet of the step is
      late or a hop's last packet is dropped, else at its last delivery (early close:
      :func:`~lossy_hooks.core.network.early_close`); a late or dropped packet is lost on its
      hop (the placement's propagation rules apply); ``x`` the deadline as a multiple of ``T_0``
      (``D x``; ``D`` seconds: ``x = D / T_0``; adaptive: :class:`AdaptiveDeadline`);
    * a phase takes the sum of its steps; the collective both phases. The deadline cuts the
      phases ``drop_point`` loses in (``deadline_phases``); a phase it does not cut runs the
      reliable transport in the lossy total too (it waits and resends: nothing is lost there).

    The completion ratios an :class:`AdaptiveDeadline` reads: rank ``r``'s ``e_r = sum_t
    c_{t,r} / sum_t tau0_t`` over the steps ``t`` at which ``r`` receives, ``c_{t,r}`` its
    last arrival there (nothing cut, drops excluded): how much slower than loss-free its own
    receives were; the collective's ``sum_t (step t's last arrival) / T_0``.
    """

    def __init__(
        self,
        network: NetworkModel,
        deadline: Deadline | AdaptiveDeadline | None = None,
        placement: Placement | None = None,
        deadline_phases: tuple[Phase, ...] = ("reduce", "broadcast"),
    ) -> None:
        self.network = network
        self.deadline = deadline
        self.deadline_phases = deadline_phases  # per hop: the phases the deadline cuts (drop_point's)
        self.placement = placement if placement is not None else ParameterServer()
        self.generator: torch.Generator | None = None
        self.totals: torch.Tensor | None = None  # float64 sums, _ALL_FIELDS
        self.lost: torch.Tensor | None = None  # ps: (W, n) packets the deadline transport lost, last call
        self.hop_lost: dict[Phase, torch.Tensor] = {}  # per hop: (R, K) late or dropped, last call
        self.last_steps: dict[Phase, torch.Tensor] = {}  # per hop: (T,) step times, nothing cut
        self.history: torch.Tensor | None = None  # (K, W + 1) completion ratios (AdaptiveDeadline)
        self.history_len = 0
        self.last_multiple: torch.Tensor | float | None = None  # x of the last call
        self.world = 1
        self.calls = 0
        self.mark = [0.0] * len(_ALL_FIELDS)
        self._timings: dict[tuple[int, float], dict[Phase, PhaseTiming]] = {}
        self._saved: dict[str, Any] | None = None

    @property
    def per_hop(self) -> bool:
        return self.placement.per_hop

    @property
    def fields(self) -> tuple[str, ...]:
        """The totals :meth:`read` reports: per phase too on a per-hop placement."""
        return _ALL_FIELDS if self.per_hop else CLOCK_FIELDS

    def prepare(self, device: torch.device, seed: int, world: int) -> None:
        """At the first bucket: the shared generator (restored from a checkpoint if one was
        loaded), the totals and the adaptive history on ``device``."""
        if self.generator is not None and self.generator.device == device:
            return
        self.world = world
        self._timings = {}
        gen = torch.Generator(device=device)
        gen.manual_seed(derive_seed(seed, Stream.CLOCK))
        totals = torch.zeros(len(_ALL_FIELDS), dtype=torch.float64, device=device)
        width = self.deadline.last if isinstance(self.deadline, AdaptiveDeadline) else 0
        history = torch.zeros((width, world + 1), dtype=torch.float64, device=device)
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
            saved_totals = self._saved["totals"]
            totals[: len(saved_totals)].copy_(saved_totals)  # a clock saved before the phase fields
            if self._saved.get("history") is not None and width:
                history.copy_(self._saved["history"])
            self._saved = None
        else:
            if self.totals is not None:
                totals.copy_(self.totals)
            if self.history is not None and width:
                history.copy_(self.history)
        self.generator, self.totals, self.history = gen, totals, history

    def timing(self, num_packets: int, nbytes: float) -> dict[Phase, PhaseTiming]:
        """A per-hop placement's price of a bucket (cached per size, on the clock's device)."""
        key = (num_packets, float(nbytes))
        if key not in self._timings:
            assert isinstance(self.placement, HopPlacement)
            device = self.generator.device if self.generator is not None else None
            self._timings[key] = self.placement.timing(self.network, self.world, num_packets, nbytes, device)
        return self._timings[key]

    def lossfree_seconds(self, nbytes: float, num_packets: int | None = None) -> float:
        """``T_0`` of one collective of ``nbytes`` bytes (``num_packets`` packets) at this
        clock's world size, as its placement prices it (:meth:`Placement.lossfree_seconds`)."""
        if self.per_hop and self.world > 1 and num_packets is not None:
            return sum(t.lossfree for t in self.timing(num_packets, nbytes).values())
        return self.placement.lossfree_seconds(self.network, nbytes, self.world, num_packets)

    def deadline_multiple(self, t0: float) -> torch.Tensor | float | None:
        """``x``: this collective's deadline as a multiple of ``T_0`` (``None``: no deadline)."""
        if self.deadline is None:
            return None
        if isinstance(self.deadline, AdaptiveDeadline):
            assert self.history is not None
            k = min(self.history_len, self.deadline.last)
            return self.deadline.multiple(self.history[:k])
        return self.deadline.multiple(t0)

    def tick(self, num_packets: int, nbytes: float, packet_bytes: float) -> None:
        """One collective of ``nbytes`` bytes in ``num_packets`` packets: draw every rank's
        arrivals, add ``T_0``, ``T_lossy`` and ``T_reliable`` (per phase on a per-hop
        placement) to the totals, and keep the packets the deadline transport lost
        (:meth:`lost_row`, :meth:`hop_late`)."""
        assert self.generator is not None and self.totals is not None
        self.calls += 1
        if self.world == 1:  # one rank: nothing crosses the network, nothing takes time or is lost
            dev = self.generator.device
            self.lost = torch.zeros((1, num_packets), dtype=torch.bool, device=dev)
            self.hop_lost = {}
            return
        if self.per_hop:
            ratios = self._tick_hops(num_packets, nbytes, packet_bytes)
        else:
            ratios = self._tick_ring(num_packets, nbytes, packet_bytes)
        if isinstance(self.deadline, AdaptiveDeadline):
            assert self.history is not None
            k = self.deadline.last
            if self.history_len < k:
                self.history[self.history_len].copy_(ratios)
            else:  # the oldest row out, the newest at the end
                self.history.copy_(torch.cat((self.history[1:], ratios[None])))
            self.history_len += 1

    def _stragglers(self) -> torch.Tensor | None:
        """``sigma_r``: ``f`` for the ranks that straggle at this call, else 1 (``None``: no stragglers)."""
        net, gen = self.network, self.generator
        assert gen is not None
        if net.straggler_prob <= 0:
            return None
        slow = torch.rand(self.world, generator=gen, device=gen.device) < net.straggler_prob
        return torch.where(slow, net.straggler_factor, 1.0).double()

    def _resends(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """``K``: transmissions lost before one arrives, ``P(K >= k) = p_0^k`` (``None``: no drops)."""
        net, gen = self.network, self.generator
        assert gen is not None
        if net.drop_rate <= 0:
            return None
        u = 1.0 - torch.rand(shape, generator=gen, dtype=torch.float64, device=gen.device)  # (0, 1]
        return torch.floor(torch.log(u) / math.log(net.drop_rate))

    def _tick_ring(self, n: int, nbytes: float, packet_bytes: float) -> torch.Tensor:
        """``algorithm="ps"``: the module's one-traversal model; returns the completion ratios."""
        net, gen, w = self.network, self.generator, self.world
        assert gen is not None and self.totals is not None
        dev = gen.device
        t0 = self.lossfree_seconds(nbytes, n)
        base = torch.full((w, 1), t0, dtype=torch.float64, device=dev)
        sigma = self._stragglers()
        if sigma is not None:
            base = sigma[:, None] * t0
        t = base + net.sample_delays((w, n), gen)
        resend = net.rto_us * 1e-6 + packet_bytes / net.beta
        tries = self._resends((w, n))
        dropped = None if tries is None else tries > 0
        reliable = t.max() if tries is None else (t + tries * resend).max()
        x = self.deadline_multiple(t0)
        if x is not None:
            d = self.deadline.seconds(t0) if isinstance(self.deadline, Deadline) else x * t0  # type: ignore[union-attr]
            lost = t > d if dropped is None else (t > d) | dropped
            lossy = early_close(t, d, dropped, torch.ones_like(t, dtype=torch.bool)).amax()
            self.lost, self.last_multiple = lost, x
        else:
            lossy = t.max()
        self.totals[0] += t0
        self.totals[1:3].add_(torch.stack((lossy, reliable)))
        arrived = t if dropped is None else torch.where(dropped, 0.0, t)
        ranks = arrived.max(1).values / t0
        return torch.cat((ranks, ranks.max()[None]))

    def _tick_hops(self, n: int, nbytes: float, packet_bytes: float) -> torch.Tensor:
        """A per-hop placement, step by step (the class docs); returns the completion ratios."""
        net, gen, w = self.network, self.generator, self.world
        assert gen is not None and self.totals is not None
        dev = gen.device
        timings = self.timing(n, nbytes)
        t0 = sum(tm.lossfree for tm in timings.values())
        sigma = self._stragglers()
        x = self.deadline_multiple(t0)
        resend = net.rto_us * 1e-6 + packet_bytes / net.beta
        sums = []
        done = torch.zeros(w, dtype=torch.float64, device=dev)  # each rank's receives, nothing cut
        own = torch.zeros(w, dtype=torch.float64, device=dev)  # the loss-free time of those steps
        whole = torch.zeros((), dtype=torch.float64, device=dev)  # the collective, nothing cut
        self.hop_lost, self.last_steps, self.last_multiple = {}, {}, x
        for phase, tm in timings.items():  # two phases
            rows, slots = tm.valid.shape
            base = tm.duration if sigma is None else sigma[tm.src] * tm.duration
            a = base[:, None] + net.sample_delays((rows, slots), gen)
            tries = self._resends((rows, slots))
            dropped = None if tries is None else tries > 0
            arrived = torch.where(tm.valid, a, 0.0)
            steps = torch.zeros(tm.levels, dtype=torch.float64, device=dev)
            steps.scatter_reduce_(0, tm.level, arrived.amax(1), "amax")
            self.last_steps[phase] = steps
            whole += steps.sum()
            if tries is None:
                reliable = steps.sum()
            else:
                retried = torch.where(tm.valid, a + tries * resend, 0.0).amax(1)
                reliable = torch.zeros_like(steps).scatter_reduce_(0, tm.level, retried, "amax").sum()
            if x is not None and phase in self.deadline_phases:
                cut = x * tm.step_lossfree  # d_t
                d = cut[tm.level][:, None]
                late = a > d
                if dropped is not None:
                    late |= dropped
                late &= tm.valid
                closes = early_close(a, d, dropped, tm.valid)  # per hop
                lossy = torch.zeros_like(steps).scatter_reduce_(0, tm.level, closes, "amax").sum()
                self.hop_lost[phase] = late
            elif x is not None:  # a phase the deadline does not cut is reliable (waits, resends)
                lossy = reliable
            else:  # no deadline model: the clock prices what the loss model loses, as for ps
                lossy = steps.sum()
            if dropped is not None:  # a dropped packet never arrives: not in the completion estimate
                arrived = torch.where(dropped, 0.0, arrived)
            per_rank = torch.zeros(tm.levels * w, dtype=torch.float64, device=dev)
            per_rank.scatter_reduce_(0, tm.level * w + tm.dst, arrived.amax(1), "amax")
            done += per_rank.view(tm.levels, w).sum(0)
            own += (tm.step_lossfree[:, None] * tm.receives).sum(0)
            sums.append(
                torch.stack((torch.full((), tm.lossfree, dtype=torch.float64, device=dev), lossy, reliable))
            )
        per_phase = torch.cat(sums)  # reduce (lossfree, comm, reliable), broadcast (...)
        total = per_phase.view(2, 3).sum(0)
        self.totals.add_(torch.cat((total, per_phase)))
        return torch.cat((done / own, whole[None] / t0))

    def lost_row(self, row: int, num_packets: int) -> torch.Tensor:
        """``algorithm="ps"``: the deadline transport's loss mask of rank ``row``'s packets at
        the last call."""
        if self.lost is None or self.lost.shape[1] != num_packets:
            raise RuntimeError(
                "the deadline loss model draws from the clock: tick() it for this bucket first"
            )
        return self.lost[row]

    def hop_late(self, phase: Phase, rows: int, slots: int) -> torch.Tensor:
        """A per-hop placement: ``(rows, slots)`` slots of ``phase``'s hops the deadline
        transport lost at the last call (the keep table's layout, roots' row excluded)."""
        late = self.hop_lost.get(phase)
        if self.world > 1 and (late is None or late.shape != (rows, slots)):
            raise RuntimeError(
                "the deadline loss model draws from the clock: tick() it for this bucket first"
            )
        if late is None:  # one rank: no hops
            assert self.generator is not None
            return torch.zeros((rows, slots), dtype=torch.bool, device=self.generator.device)
        return late

    def hop_keep_probability(self, phase: Phase, num_packets: int, nbytes: float) -> np.ndarray:
        """A fixed deadline on a per-hop placement: per hop of ``phase`` the closed-form
        probability that a packet is on time and not dropped,
        ``(1 - p_0) [(1 - q) F(d_t - D_h) + q F(d_t - f D_h)]``, ``d_t = x tau0_t``.

        One value per row of the keep table but the roots' (``L S`` rows, the layout of
        :class:`~lossy_hooks.core.placement.timing.PhaseTiming`), including rows that carry
        nothing: a row no ``(chunk, rank)`` sends on (a link that carries fewer chunks than
        the phase's ``S``, e.g. 4 of the 12 rows of each phase of ``dbtree`` at ``W = 5``), and,
        when the bucket has fewer packets than chunks, the hops of an empty chunk. Such a row
        has ``D_h = 0`` and step 0's deadline ``d_0``, so its value is ``(1 - p_0) F(d_0)``,
        which describes no packet. It is never used: the library's one caller,
        ``HopLoss.path_keep``, multiplies the values along each ``(chunk, rank)``'s path
        (``PhaseShape.hop``), which never passes through a row of the first kind, and the
        broadcast rescale reads ``q[c, r]`` only for chunks that hold a packet, so never for a
        path through a row of the second kind (tests/unit/test_hop_clock.py compares only
        rows with ``carried > 0`` with the measured losses)."""
        if not isinstance(self.deadline, Deadline):
            raise ValueError("only a fixed deadline has a closed-form keep probability per hop")
        timings = self.timing(num_packets, nbytes)
        tm = timings[phase]
        x = self.deadline.multiple(sum(t.lossfree for t in timings.values()))
        cut = x * tm.step_lossfree_host[tm.level_host]
        pairs, inverse = np.unique(np.stack((cut, tm.duration_host)), axis=1, return_inverse=True)
        keep = [1.0 - self.network.deadline_loss_probability(d, dur, self.world) for d, dur in pairs.T]
        return np.asarray(keep, dtype=np.float64)[inverse.reshape(-1)]

    def read(self) -> dict[str, float]:
        """The totals so far (seconds; one host sync), and ``calls``."""
        if self.totals is not None:
            values = self.totals.tolist()
        elif self._saved is not None:
            values = self._saved["totals"].tolist()
        else:
            values = []
        values += [0.0] * (len(_ALL_FIELDS) - len(values))
        return {k: v for k, v in zip(_ALL_FIELDS, values, strict=True) if k in self.fields} | {
            "calls": self.calls
        }

    def since_mark(self) -> dict[str, float]:
        """What the clock added since the previous call (an epoch), then a new mark."""
        now = self.read()
        fields = [k for k in _ALL_FIELDS if k in now]
        marks = dict(zip(_ALL_FIELDS, self.mark, strict=False))
        delta = {k: now[k] - marks.get(k, 0.0) for k in fields}
        self.mark = [now.get(k, 0.0) for k in _ALL_FIELDS]
        return delta

    def state_dict(self) -> dict[str, Any]:
        history = None
        if self.generator is not None and self.totals is not None:
            gen = (self.generator.device.type, self.generator.get_state())
            totals = self.totals.detach().cpu()
            history = None if self.history is None else self.history.detach().cpu()
        elif self._saved is not None:
            gen, totals, history = self._saved["generator"], self._saved["totals"], self._saved.get("history")
        else:
            gen, totals = None, torch.zeros(len(_ALL_FIELDS), dtype=torch.float64)
        return {
            "generator": gen,
            "totals": totals,
            "calls": self.calls,
            "mark": list(self.mark),
            "history": history,
            "history_len": self.history_len,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.generator, self.totals, self.lost, self.history = None, None, None, None
        self.hop_lost, self.last_steps = {}, {}
        self.calls = int(sd["calls"])
        self.mark = [float(x) for x in sd["mark"]]
        self.mark += [0.0] * (len(_ALL_FIELDS) - len(self.mark))
        self.history_len = int(sd.get("history_len", 0))
        gen, totals = sd["generator"], sd["totals"].detach().cpu().double()
        history = sd.get("history")
        if gen is None:  # saved before the first collective: nothing drawn yet
            self._saved = None
        else:  # Generator.set_state takes a CPU ByteTensor (a map_location may have moved it)
            self._saved = {
                "generator": (str(gen[0]), gen[1].detach().cpu()),
                "totals": totals,
                "history": None if history is None else history.detach().cpu().double(),
            }

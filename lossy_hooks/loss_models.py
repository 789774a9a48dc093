"""Packet loss models: which packets of a bucket are lost.

Every model answers one question: given ``n`` packets and a ``torch.Generator``, which
of them are lost? :meth:`LossModel.sample` returns a bool tensor of length ``n`` on the
generator's device (``True`` = lost). Sampling is vectorized (no Python loop over
packets, no host synchronisation); models with memory (Markov chains, traces) carry their
state from packet to packet, bucket to bucket and step to step, and expose it through
``state_dict()`` so a checkpoint resumes the exact loss sequence.

Models
------
- :class:`Bernoulli` ``(p)``: i.i.d. loss with probability ``p`` per packet (netem ``random P``).
- :class:`ExactCount` ``(p)``: exactly ``floor(p*n)`` packets of each bucket, uniformly
  chosen (the original study's rule).
- :class:`GilbertElliott` ``(p, r, loss_in_bad, loss_in_good)``: netem ``gemodel p r 1-h 1-k``.
- :class:`MarkovFourState` ``(p13, p31, p32, p23, p14)``: netem ``loss state``.
- :class:`TailDrop` ``(p)``: the last ``ceil(p*n)`` packets of each bucket (a deadline cut).
- :class:`Trace` ``(seq_or_path)``: a recorded 0/1 loss sequence replayed cyclically.

:func:`parse_loss_model` reads netem's syntax (percentages, ``%`` optional, as in ``tc``).
"""

from __future__ import annotations

import copy
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "Bernoulli",
    "ExactCount",
    "GilbertElliott",
    "LossModel",
    "MarkovFourState",
    "MarkovLossModel",
    "TailDrop",
    "Trace",
    "parse_loss_model",
]

# Tolerance used when turning p*n into a whole number of packets, so that 0.3*10 counts 3.
_COUNT_EPS = 1e-9


def check_probability(name: str, value: float) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` naming ``name`` if not in [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}") from None
    if not (0.0 <= v <= 1.0) or math.isnan(v):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return v


def _pct(p: float) -> str:
    return f"{p * 100:.6g}%"


class LossModel(ABC):
    """A packet loss process.

    Subclasses implement :meth:`sample` and :meth:`long_run_loss_rate`. Models with memory
    override :meth:`state_dict` / :meth:`load_state_dict`.
    """

    @abstractmethod
    def sample(self, num_packets: int, generator: torch.Generator) -> torch.Tensor:
        """Loss mask for the next ``num_packets`` packets: bool tensor, ``True`` = lost,
        on ``generator.device``."""

    @abstractmethod
    def long_run_loss_rate(self) -> float:
        """The model's long-run (stationary) packet loss probability ``p``."""

    @property
    @abstractmethod
    def spec(self) -> str:
        """The model in :func:`parse_loss_model` syntax (used in run names and configs)."""

    def is_lossless(self) -> bool:
        """True when the model can never lose a packet (the hook then skips all masking)."""
        return False

    def keep_fraction(self, num_packets: int) -> float:
        r"""``E[fraction of a bucket's n packets received]``: what post-drop ``fill="rescale"``
        divides by. For a model under which every packet has the same marginal keep
        probability ``q`` (i.i.d. models, uniformly chosen subsets, stationary chains),
        ``E[b_j / q] = 1``: exactly unbiased per packet. Default: ``1 - p`` with ``p`` the
        long-run loss rate; models that lose a fixed number of packets per bucket override it."""
        return 1.0 - self.long_run_loss_rate()

    def start_stream(self, seed: int) -> None:  # noqa: B027 (random models: nothing to do)
        """Called once when a fresh stream (one rank's, or the shared one) starts using this
        copy of the model, with a seed of that stream's own. Deterministic models use it to
        give each stream its own phase (:class:`Trace`); random ones need nothing."""

    def state_dict(self) -> dict[str, Any]:
        """Memory carried between calls (empty for memoryless models)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (memoryless: nothing to restore)
        """Restore what :meth:`state_dict` returned."""

    def clone(self) -> LossModel:
        """An independent copy (each drop point owns one)."""
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class RateModel(LossModel):
    """A memoryless model with one parameter, the loss rate ``p`` in [0, 1], written in
    netem text as ``<keyword> P%``."""

    keyword = ""
    param_name = "p"

    def __init__(self, p: float) -> None:
        self.p = check_probability(self.param_name, p)

    def long_run_loss_rate(self) -> float:
        return self.p

    def is_lossless(self) -> bool:
        return self.p == 0.0

    @property
    def spec(self) -> str:
        return f"{self.keyword} {_pct(self.p)}"


class Bernoulli(RateModel):
    """Independent loss: each packet is lost with probability ``p``.

    ``lost_i ~ Bernoulli(p)`` i.i.d.; the number lost among ``n`` is Binomial(n, p).
    """

    keyword, param_name = "random", "loss_rate (Bernoulli p)"

    def sample(self, num_packets: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(num_packets, generator=generator, device=generator.device)
        return u < self.p


class ExactCount(RateModel):
    """Exactly ``m = floor(p*n)`` of the ``n`` packets of each bucket are lost, the set
    chosen uniformly among all ``C(n, m)`` subsets (the original script's rule).

    Each packet is lost with probability exactly ``m/n`` (not ``p``), so the post-drop
    rescale divides by ``(n - m)/n``: exactly unbiased per packet."""

    keyword, param_name = "exact", "ExactCount p"

    def keep_fraction(self, num_packets: int) -> float:
        if num_packets <= 0:
            return 1.0
        return (num_packets - math.floor(self.p * num_packets + _COUNT_EPS)) / num_packets

    def sample(self, num_packets: int, generator: torch.Generator) -> torch.Tensor:
        m = math.floor(self.p * num_packets + _COUNT_EPS)
        lost = torch.zeros(num_packets, dtype=torch.bool, device=generator.device)
        if m > 0:
            perm = torch.randperm(num_packets, generator=generator, device=generator.device)
            lost[perm[:m]] = True
        return lost


class TailDrop(RateModel):
    """The last ``ceil(p*n)`` packets of each bucket are lost: a collective cut off by a
    deadline, as in bounded-time allreduce designs. Deterministic (uses no randomness)."""

    keyword, param_name = "tail", "TailDrop p"

    def keep_fraction(self, num_packets: int) -> float:
        """``(n - ceil(p n)) / n``: the fraction that is always received. No rule can make a
        packet that is always lost unbiased; dividing the survivors by this keeps the
        bucket's sum for equal-sized packets (what a deadline-cut collective would report)."""
        if num_packets <= 0:
            return 1.0
        return (num_packets - math.ceil(self.p * num_packets - _COUNT_EPS)) / num_packets

    def sample(self, num_packets: int, generator: torch.Generator) -> torch.Tensor:
        m = math.ceil(self.p * num_packets - _COUNT_EPS)
        return torch.arange(num_packets, device=generator.device) >= (num_packets - m)


def _read_trace_file(path: str) -> list[int]:
    with open(path, encoding="utf-8") as fh:
        text = "\n".join(line.split("#", 1)[0] for line in fh)
    bad = re.sub(r"[01\s,;]", "", text)
    if bad:
        raise ValueError(
            f"trace file {path!r} must contain only 0/1 loss indicators "
            f"(separated by spaces, commas or newlines; '#' starts a comment), found {bad[:20]!r}"
        )
    return [int(c) for c in re.findall(r"[01]", text)]


class Trace(LossModel):
    """Replays a recorded loss sequence ``t_0, t_1, ..., t_{L-1}`` (1 = lost) cyclically:
    packet ``j`` of a stream that starts at offset ``o`` is lost iff ``t_{(o + j) mod L} = 1``.
    The position carries over between buckets and steps. Inside the hook each stream (each
    rank's uplink, the shared post stream, each rank's independent post stream) starts at an
    offset drawn from ``(seed, stream, rank)`` (:meth:`start_stream`); alone, at 0.
    ``seq_or_path`` is a sequence of 0/1 or a text file of 0/1 characters (whitespace/commas
    allowed, ``#`` comments)."""

    def start_stream(self, seed: int) -> None:
        """Each stream replays the trace from its own offset ``seed mod L`` (uniform over
        the trace), so the ranks' uplinks do not lose the same packets."""
        self.position = seed % self._trace.numel()

    def __init__(self, seq_or_path: Sequence[int] | str | os.PathLike[str]) -> None:
        if isinstance(seq_or_path, (str, os.PathLike)):
            self.path: str | None = os.fspath(seq_or_path)
            if not os.path.isfile(self.path):
                raise ValueError(f"trace file {self.path!r} does not exist")
            values = _read_trace_file(self.path)
        else:
            self.path = None
            values = [int(v) for v in seq_or_path]
            if any(v not in (0, 1) for v in values):
                raise ValueError("Trace sequence must contain only 0 and 1")
        if not values:
            raise ValueError("Trace sequence is empty: it needs at least one 0/1 entry")
        self._trace = torch.tensor(values, dtype=torch.bool)
        self._on_device: dict[torch.device, torch.Tensor] = {}
        self.position = 0

    def _trace_on(self, device: torch.device) -> torch.Tensor:
        t = self._on_device.get(device)
        if t is None:
            t = self._trace.to(device)
            self._on_device[device] = t
        return t

    def sample(self, num_packets: int, generator: torch.Generator) -> torch.Tensor:
        trace = self._trace_on(generator.device)
        length = trace.numel()
        idx = torch.arange(num_packets, device=generator.device).add_(self.position)
        self.position = (self.position + num_packets) % length
        return trace.index_select(0, idx.remainder_(length))

    def long_run_loss_rate(self) -> float:
        return float(self._trace.float().mean())

    def is_lossless(self) -> bool:
        return not bool(self._trace.any())

    @property
    def spec(self) -> str:
        if self.path is not None:
            return f"trace {self.path}"
        return f"trace <{self._trace.numel()} entries, {_pct(self.long_run_loss_rate())} lost>"

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"]) % self._trace.numel()

    def __deepcopy__(self, memo: dict[int, Any]) -> Trace:
        new = copy.copy(self)
        new._on_device = {}
        return new


# Markov sampling: a scan over packets in blocks of this many (see _TransitionMaps.states).
_SCAN_BLOCK = 16
# Chains whose transition maps compose into more distinct maps than this use the slower
# (n x S) gather scan instead of a composition table (<= 256 maps for any chain of <= 4 states).
_MAX_COMPOSED_MAPS = 1024


class _MapTables(NamedTuple):
    """:class:`_TransitionMaps`' lookup tables on one device."""

    breakpoints: torch.Tensor
    generator: torch.Tensor
    compose: torch.Tensor
    apply: torch.Tensor


class _TransitionMaps:
    """The finite monoid generated by a chain's coupled transition maps, as lookup tables.

    With one uniform ``u`` per packet, ``f_u(s) = #{j : CDF[s, j] <= u}`` (float32 compare,
    last column +inf) is the next state from ``s``. ``f_u`` only depends on which interval of
    the sorted finite CDF values ``b_0 < b_1 < ...`` holds ``u``: ``k = #{b <= u}`` (one
    ``searchsorted``), so a packet's map is a small integer. Every composition of these maps is
    enumerated once (numpy, at construction) and numbered; the tables are

    - ``generator[k]``: number of the map of interval ``k``;
    - ``compose[a * K + b]``: number of ``f_a o f_b`` (``f_b`` first);
    - ``apply[a * S + s]``: ``f_a(s)``.

    :meth:`states` then computes ``S_i = (f_i o ... o f_0)(S_{-1})`` with 1-D ``index_select``
    lookups only: a Hillis-Steele scan inside blocks of ``B`` packets (``log2 B`` doublings over
    ``n`` numbers), the same scan over the ``n/B`` block totals, and one lookup that applies
    each packet's in-block prefix to its block's start state: about ``(log2 B + 1) n`` lookups
    instead of ``n log2 n`` gathers of ``S`` states each.
    """

    def __init__(self, cdf32: np.ndarray) -> None:
        num_states = cdf32.shape[0]
        self._on_device: dict[torch.device, _MapTables] = {}
        finite = cdf32[np.isfinite(cdf32)]
        self.breakpoints_np = np.unique(finite).astype(np.float32)
        lows = np.concatenate(([-np.inf], self.breakpoints_np.astype(np.float64)))
        # gen_maps[k, s] = f(s) for any u in [b_{k-1}, b_k)
        gen_maps = (cdf32[None, :, :] <= lows[:, None, None]).sum(axis=2)
        maps = np.unique(np.vstack([np.arange(num_states)[None, :], gen_maps]), axis=0)
        while len(maps) <= _MAX_COMPOSED_MAPS:  # close under composition
            composed = maps[:, maps].reshape(-1, num_states)  # rows: f_a o f_b
            grown = np.unique(np.vstack([maps, composed]), axis=0)
            if len(grown) == len(maps):
                break
            maps = grown
        self.closed = len(maps) <= _MAX_COMPOSED_MAPS
        self.num_states = num_states
        if not self.closed:
            return
        index = {tuple(m): i for i, m in enumerate(maps)}
        self.num_maps = len(maps)
        self.identity = index[tuple(range(num_states))]
        self.generator_np = np.array([index[tuple(m)] for m in gen_maps], dtype=np.int32)
        composed = maps[:, maps].reshape(-1, num_states)
        self.compose_np = np.array([index[tuple(m)] for m in composed], dtype=np.int32)
        self.apply_np = maps.reshape(-1).astype(np.int32)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_on_device": {}}

    def tables(self, device: torch.device) -> _MapTables:
        t = self._on_device.get(device)
        if t is None:
            t = _MapTables(
                *(
                    torch.from_numpy(a).to(device)
                    for a in (self.breakpoints_np, self.generator_np, self.compose_np, self.apply_np)
                )
            )
            self._on_device[device] = t
        return t

    def _scan(self, codes: torch.Tensor, compose: torch.Tensor) -> None:
        """In place along the last dim: ``codes[..., i] <- codes[..., i] o ... o codes[..., 0]``."""
        k = self.num_maps
        width = codes.shape[-1]
        step = 1
        while step < width:
            later, earlier = codes[..., step:], codes[..., :-step]
            later.copy_(
                compose.index_select(0, torch.add(earlier, later, alpha=k).view(-1)).view(later.shape)
            )
            step *= 2

    def state_indices(self, u: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Indices ``a * S + s`` into ``apply`` whose values are the states after each packet
        (int32 throughout: half the memory traffic of int64, and faster integer kernels)."""
        breakpoints, generator, compose, apply = self.tables(u.device)
        n, b, s = u.numel(), _SCAN_BLOCK, self.num_states
        blocks = -(-n // b)
        interval = torch.searchsorted(breakpoints, u, right=True, out_int32=True)
        codes = torch.full((blocks * b,), self.identity, dtype=torch.int32, device=u.device)
        torch.index_select(generator, 0, interval, out=codes[:n])
        codes = codes.view(blocks, b)
        self._scan(codes, compose)  # within blocks
        totals = codes[:, -1].clone()
        self._scan(totals, compose)  # totals[j] = blocks 0..j
        start = start.to(torch.int32).view(1)
        block_start = torch.cat((start, apply.index_select(0, torch.add(start, totals[:-1], alpha=s))))
        return torch.add(block_start[:, None], codes, alpha=s).view(-1)[:n]


def _scan_states_by_gather(cdf: torch.Tensor, u: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """States by a Hillis-Steele scan over ``(n, S)`` arrays of maps (for chains whose maps
    generate more than ``_MAX_COMPOSED_MAPS`` compositions)."""
    n, k = u.numel(), cdf.shape[0]
    maps = torch.searchsorted(cdf, u.expand(k, n).contiguous(), right=True).t()
    step = 1
    while step < n:  # maps[i] <- maps[i] o maps[i - step]
        maps = torch.cat((maps[:step], torch.gather(maps[step:], 1, maps[:-step])))
        step *= 2
    return maps.gather(1, start.expand(n, 1)).squeeze(1)


class MarkovLossModel(LossModel):
    """A finite Markov chain ``S_0, S_1, ...`` with transition matrix ``P``; packet ``i``
    moves the chain (``S_i ~ P[S_{i-1}, :]``) and is lost with probability ``h[S_i]`` (the
    state it moved to: netem's four-state model) or, with ``loss_from_previous_state``,
    ``h[S_{i-1}]`` (the state it arrived in: netem's Gilbert-Elliott). The chain starts in
    state 0 (``S_{-1} = 0``) and its state carries over between calls.

    Vectorized sampling: one uniform ``u_i`` per packet defines the transition map
    ``f_i(s) = min{j : u_i < CDF[s, j]}`` for every state ``s`` at once (a coupling that
    gives each row its correct law). The states are prefix compositions
    ``S_i = (f_i o ... o f_0)(S_{-1})``, computed by a blocked scan over the numbers of the
    maps in a precomputed composition table (:class:`_TransitionMaps`): ``O(n log B)``
    1-D lookups, no loop over packets, no host sync. The states are exactly those of the
    sequential recursion with the same uniforms.
    """

    loss_from_previous_state = False

    def __init__(self, transition: np.ndarray, loss_prob: np.ndarray) -> None:
        self._transition = np.asarray(transition, dtype=np.float64)
        self._loss_prob = np.asarray(loss_prob, dtype=np.float64)
        cdf = np.cumsum(self._transition, axis=1)
        cdf[:, -1] = np.inf  # guards against u landing above a rounded 1.0
        cdf32 = cdf.astype(np.float32)
        self._cdf = torch.from_numpy(cdf32)
        self._h = torch.tensor(self._loss_prob, dtype=torch.float32)
        self._deterministic = bool(np.all((self._loss_prob == 0) | (self._loss_prob == 1)))
        self._maps = _TransitionMaps(cdf32)
        self._state = torch.zeros((), dtype=torch.long)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def transition_matrix(self) -> np.ndarray:
        return self._transition.copy()

    @property
    def loss_probabilities(self) -> np.ndarray:
        return self._loss_prob.copy()

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CDF, loss probability per state, and (closed chains) ``lost_after[a * S + s]``:
        whether the state ``f_a(s)`` always loses (deterministic models)."""
        t = self._cache.get(device)
        if t is None:
            cdf, h = self._cdf.to(device), self._h.to(device)
            lost_after = torch.zeros(0, dtype=torch.bool, device=device)
            if self._maps.closed:
                lost_after = h.index_select(0, self._maps.tables(device).apply) > 0.5
            t = (cdf, h, lost_after)
            self._cache[device] = t
        return t

    def sample(self, num_packets: int, generator: torch.Generator) -> torch.Tensor:
        device = generator.device
        if num_packets == 0:
            return torch.zeros(0, dtype=torch.bool, device=device)
        cdf, h, lost_after = self._tables(device)
        if self._state.device != device:
            self._state = self._state.to(device)
        n = num_packets
        u = torch.rand(n, generator=generator, device=device)
        start = self._state
        if self._maps.closed:
            idx = self._maps.state_indices(u, start)
            apply = self._maps.tables(device).apply
            self._state = apply.index_select(0, idx[-1:]).squeeze(0).long()
            if self._deterministic and not self.loss_from_previous_state:
                return lost_after.index_select(0, idx)
            states = apply.index_select(0, idx)
        else:
            states = _scan_states_by_gather(cdf, u, start)
            self._state = states[-1].clone()
        if self.loss_from_previous_state:  # S_{-1}, S_0, ..., S_{n-2}
            states = torch.cat((start.to(states.dtype).view(1), states[:-1]))
        if self._deterministic:
            return h.index_select(0, states) > 0.5
        return torch.rand(n, generator=generator, device=device) < h.index_select(0, states)

    def stationary_distribution(self) -> np.ndarray:
        """Long-run share of packets in each state, starting from state 0: the Cesaro limit
        ``lim (1/T) sum_t e_0 P^t``, well defined for reducible and periodic chains too.

        Solved exactly, no powers of ``P``: the chain's closed communicating classes ``C``
        each have one stationary law ``pi_C`` (``pi_C (P_C - I) = 0``, ``sum pi_C = 1``, a
        linear solve); from state 0 the chain ends in ``C`` with probability ``a_C`` (``a = 1``
        on ``C``, ``a = P a`` on transient states: another linear solve); the limit is
        ``sum_C a_C pi_C``."""
        return cesaro_limit(self._transition, start=0)

    def long_run_loss_rate(self) -> float:
        return float(self.stationary_distribution() @ self._loss_prob)

    def is_lossless(self) -> bool:
        return self.long_run_loss_rate() == 0.0 and not self._loss_prob.any()

    def state_dict(self) -> dict[str, Any]:
        return {"state": int(self._state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = torch.tensor(int(state["state"]), dtype=torch.long)

    def __deepcopy__(self, memo: dict[int, Any]) -> MarkovLossModel:
        new = copy.copy(self)
        new._state = self._state.clone()
        new._cache = {}
        return new

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_cache"] = {}
        d["_state"] = self._state.cpu()
        return d


class GilbertElliott(MarkovLossModel):
    """Gilbert-Elliott two-state model, netem ``gemodel p r 1-h 1-k``.

    States Good (0) and Bad (1); ``P(G->B) = p``, ``P(B->G) = r``; a packet is lost with
    probability ``loss_in_bad`` (``1-h``) in Bad and ``loss_in_good`` (``1-k``) in Good.
    As in netem's ``loss_gilb_ell`` (sch_netem.c), each packet draws the transition and then
    decides its loss with the state it arrived in: ``gemodel 100% 0%`` loses 0,1,1,1,...
    and ``gemodel 100% 100%`` 0,1,0,1,...
    Stationary ``pi_B = p / (p + r)``, long-run loss ``pi_B (1-h) + (1-pi_B)(1-k)``; with
    ``1-h = 1, 1-k = 0`` loss bursts are Bad sojourns, of mean length ``1/r`` packets.
    """

    def __init__(self, p: float, r: float, loss_in_bad: float = 1.0, loss_in_good: float = 0.0):
        self.p = check_probability("gemodel p", p)
        self.r = check_probability("gemodel r", r)
        self.loss_in_bad = check_probability("gemodel 1-h (loss_in_bad)", loss_in_bad)
        self.loss_in_good = check_probability("gemodel 1-k (loss_in_good)", loss_in_good)
        transition = np.array([[1 - self.p, self.p], [self.r, 1 - self.r]])
        self.loss_from_previous_state = True
        super().__init__(transition, np.array([self.loss_in_good, self.loss_in_bad]))

    @property
    def spec(self) -> str:
        return f"gemodel {_pct(self.p)} {_pct(self.r)} {_pct(self.loss_in_bad)} {_pct(self.loss_in_good)}"


def cesaro_limit(transition: np.ndarray, start: int = 0) -> np.ndarray:
    """``lim (1/T) sum_{t<T} e_start P^t`` of a finite stochastic matrix, by linear solves
    (see :meth:`MarkovLossModel.stationary_distribution`)."""
    p = np.asarray(transition, dtype=np.float64)
    n = len(p)
    reach = (p > 0) | np.eye(n, dtype=bool)
    for _ in range(max(1, int(np.ceil(np.log2(n))) + 1)):  # transitive closure by squaring
        reach = reach | ((reach.astype(np.int64) @ reach.astype(np.int64)) > 0)
    mutual = reach & reach.T
    classes: list[np.ndarray] = []
    seen = np.zeros(n, dtype=bool)
    for i in range(n):
        if not seen[i]:
            members = np.flatnonzero(mutual[i])
            seen[members] = True
            classes.append(members)
    closed = [c for c in classes if not reach[np.ix_(c, np.setdiff1d(np.arange(n), c))].any()]
    in_closed = np.zeros(n, dtype=bool)
    for c in closed:
        in_closed[c] = True
    transient = np.flatnonzero(~in_closed)
    out = np.zeros(n)
    for c in closed:
        # stationary law of the class: pi (P_C - I) = 0 with sum(pi) = 1 (least squares on
        # the stacked system: exact, as the class is irreducible and the system consistent)
        pc = p[np.ix_(c, c)]
        a_mat = np.vstack([(pc - np.eye(len(c))).T, np.ones(len(c))])
        b_vec = np.zeros(len(c) + 1)
        b_vec[-1] = 1.0
        pi_c = np.linalg.lstsq(a_mat, b_vec, rcond=None)[0]
        if start in c:
            absorb = 1.0
        elif start in transient:
            # absorption probabilities into c from transient states: (I - Q) a = R 1_c
            q = p[np.ix_(transient, transient)]
            r = p[np.ix_(transient, c)].sum(axis=1)
            a = np.linalg.solve(np.eye(len(transient)) - q, r)
            absorb = float(a[np.flatnonzero(transient == start)[0]])
        else:
            absorb = 0.0
        out[c] += absorb * np.clip(pi_c, 0.0, None)
    return out / out.sum()


class MarkovFourState(MarkovLossModel):
    """netem's four-state model (``loss state p13 p31 p32 p23 p14``), iproute2's numbering.

    States: 1 = received in a gap, 2 = received in a burst, 3 = lost in a burst,
    4 = isolated loss in a gap. Transitions ``1->3: p13``, ``1->4: p14``, ``1->1: 1-p13-p14``;
    ``3->1: p31``, ``3->2: p32``, ``3->3: 1-p31-p32``; ``2->3: p23``, ``2->2: 1-p23``;
    ``4->1: 1``. A packet is lost iff the chain is in state 3 or 4. Defaults as iproute2:
    ``p31 = 1 - p13``, ``p32 = 0``, ``p23 = 1``, ``p14 = 0``.
    """

    def __init__(
        self,
        p13: float,
        p31: float | None = None,
        p32: float = 0.0,
        p23: float = 1.0,
        p14: float = 0.0,
    ) -> None:
        self.p13 = check_probability("state p13", p13)
        self.p31 = check_probability("state p31", 1.0 - self.p13 if p31 is None else p31)
        self.p32 = check_probability("state p32", p32)
        self.p23 = check_probability("state p23", p23)
        self.p14 = check_probability("state p14", p14)
        if self.p13 + self.p14 > 1.0 + 1e-12:
            raise ValueError(f"state p13 + p14 must be <= 1, got {self.p13 + self.p14:g}")
        if self.p31 + self.p32 > 1.0 + 1e-12:
            raise ValueError(f"state p31 + p32 must be <= 1, got {self.p31 + self.p32:g}")
        t = np.array(
            [
                [1 - self.p13 - self.p14, 0.0, self.p13, self.p14],
                [0.0, 1 - self.p23, self.p23, 0.0],
                [self.p31, self.p32, 1 - self.p31 - self.p32, 0.0],
                [1.0, 0.0, 0.0, 0.0],
            ]
        )
        super().__init__(np.clip(t, 0.0, 1.0), np.array([0.0, 0.0, 1.0, 1.0]))

    @property
    def spec(self) -> str:
        ps = (self.p13, self.p31, self.p32, self.p23, self.p14)
        return "state " + " ".join(_pct(p) for p in ps)


def _parse_percent(token: str, what: str) -> float:
    """netem percentages: ``"5%"`` and ``"5"`` both mean 5% (as iproute2's parse_percent)."""
    text = token[:-1] if token.endswith("%") else token
    try:
        value = float(text) / 100.0
    except ValueError:
        raise ValueError(f"loss model: {what} must be a percentage like 5%, got {token!r}") from None
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"loss model: {what} must be between 0% and 100%, got {token!r}")
    return value


_SYNTAX = (
    "random P | state P13 [P31 [P32 [P23 [P14]]]] | gemodel P [R [1-H [1-K]]] | "
    "exact P | tail P | trace FILE  (percentages as in tc-netem: '5%' or '5')"
)


def parse_loss_model(spec: str) -> LossModel:
    """Build a loss model from netem-style text.

    Accepted (an optional leading ``loss`` is ignored; ``loss 5%`` means ``random 5%``)::

        random P                          -> Bernoulli(P)
        state P13 [P31 [P32 [P23 [P14]]]] -> MarkovFourState (iproute2 defaults)
        gemodel P [R [1-H [1-K]]]         -> GilbertElliott, R defaults to 1-P, 1-H to 100%, 1-K to 0%
        exact P                           -> ExactCount(P)
        tail P                            -> TailDrop(P)
        trace FILE                        -> Trace(FILE)

    Numbers are percentages as in ``tc``: ``5%`` and ``5`` both mean 0.05.
    """
    tokens = spec.split()
    if tokens and tokens[0] == "loss":
        tokens = tokens[1:]
    if not tokens:
        raise ValueError(f"loss model is empty; expected one of: {_SYNTAX}")
    kind, args = tokens[0], tokens[1:]
    if kind[0].isdigit() or kind[0] == ".":
        kind, args = "random", tokens

    def nargs(lo: int, hi: int) -> None:
        if not (lo <= len(args) <= hi):
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise ValueError(f"loss model {kind!r} takes {want} argument(s), got {len(args)} in {spec!r}")

    if kind == "random":
        if len(args) == 2:
            raise ValueError(
                "loss model 'random P CORRELATION' is not supported (netem deprecated it); "
                "use 'gemodel' or 'state' for bursty loss"
            )
        nargs(1, 1)
        return Bernoulli(_parse_percent(args[0], "random P"))
    if kind == "exact":
        nargs(1, 1)
        return ExactCount(_parse_percent(args[0], "exact P"))
    if kind == "tail":
        nargs(1, 1)
        return TailDrop(_parse_percent(args[0], "tail P"))
    if kind == "trace":
        nargs(1, 1)
        return Trace(args[0])
    if kind == "gemodel":
        nargs(1, 4)
        names = ("gemodel p", "gemodel r", "gemodel 1-h", "gemodel 1-k")
        vals = [_parse_percent(a, n) for a, n in zip(args, names, strict=False)]
        p = vals[0]
        r = vals[1] if len(vals) > 1 else 1.0 - p
        bad = vals[2] if len(vals) > 2 else 1.0
        good = vals[3] if len(vals) > 3 else 0.0
        return GilbertElliott(p, r, bad, good)
    if kind == "state":
        nargs(1, 5)
        names = ("state p13", "state p31", "state p32", "state p23", "state p14")
        vals = [_parse_percent(a, n) for a, n in zip(args, names, strict=False)]
        return MarkovFourState(*vals)
    raise ValueError(f"unknown loss model {kind!r} in {spec!r}; expected one of: {_SYNTAX}")

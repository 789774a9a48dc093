"""Models without a chain: i.i.d. loss, a fixed count per bucket, a deadline cut, a trace."""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from lossy_hooks.loss_models.base import _COUNT_EPS, LossModel, RateModel, _pct

__all__ = ["Bernoulli", "ExactCount", "TailDrop", "Trace"]


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

"""The loss-model interface: what every model answers, and the shared parameter checks."""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lossy_hooks.core.options import LossConfig

__all__ = ["LossModel", "RateModel", "check_probability", "rate_or_none"]


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

    def refuses(self, config: LossConfig) -> str | None:
        """Why this model cannot lose packets under ``config`` (the other settings), or
        ``None`` (the default: every model works with every setting)."""
        return None

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

    def bucket_keep_fraction(self, num_packets: int, wire_bytes: float) -> float:
        """:meth:`keep_fraction` of a bucket of ``num_packets`` packets and ``wire_bytes`` bytes
        on the wire: what the hook and the FSDP collectives call. Models whose loss depends on
        the bucket's size (:class:`~lossy_hooks.loss_models.DeadlineLoss`) override this one;
        the others (and subclasses that override :meth:`keep_fraction` alone) need not."""
        return self.keep_fraction(num_packets)

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


def rate_or_none(model: LossModel) -> float | None:
    """The long-run loss rate, ``None`` where there is no single one (deadline loss: it
    depends on the bucket), so that configurations compare equal (NaN != NaN)."""
    rate = model.long_run_loss_rate()
    return None if math.isnan(rate) else rate


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

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
- :class:`DeadlineLoss` ``(deadline)``: packets the simulated network drops or delivers late
  (:mod:`lossy_hooks.core.netclock`; needs ``LossyState(network=...)``).

:func:`parse_loss_model` reads netem's syntax (percentages, ``%`` optional, as in ``tc``).
"""

from lossy_hooks.loss_models.base import LossModel, RateModel, check_probability, rate_or_none
from lossy_hooks.loss_models.deadline import DeadlineLoss
from lossy_hooks.loss_models.markov import GilbertElliott, MarkovFourState, MarkovLossModel, cesaro_limit
from lossy_hooks.loss_models.memoryless import Bernoulli, ExactCount, TailDrop, Trace
from lossy_hooks.loss_models.netem import LOSS_MODEL_SYNTAX, parse_loss_model

__all__ = [
    "LOSS_MODEL_SYNTAX",
    "Bernoulli",
    "DeadlineLoss",
    "ExactCount",
    "GilbertElliott",
    "LossModel",
    "MarkovFourState",
    "MarkovLossModel",
    "RateModel",
    "TailDrop",
    "Trace",
    "cesaro_limit",
    "check_probability",
    "parse_loss_model",
    "rate_or_none",
]

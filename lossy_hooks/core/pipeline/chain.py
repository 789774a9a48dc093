r"""The technique chain around one collective: the part of the packet pipeline every kind
of reduction shares (an all-reduce: :mod:`.allreduce`; a reduce-scatter: :mod:`.sharded`).

With the loss masks of the call drawn (``call.lost``, ``call.post_lost``),
:func:`before_collective` runs each technique's ``before_wire`` in chain order
(``b_k(...b_1(g))``: fidelity, error feedback, encoding, the fill, the wire dtype) and gives
what travels; the caller launches the collective on it, and on every tensor a technique
asked to have reduced too (``call.extra``), in its own body; :func:`after_collective` runs
each ``after_collective`` in reverse order on the results (``a_1(...a_k(C))``), compute only,
so the same function serves a future's callback."""

from __future__ import annotations

import torch

from lossy_hooks.core.techniques import BucketCall

__all__ = ["after_collective", "before_collective"]


def before_collective(call: BucketCall) -> torch.Tensor:
    """What travels for ``call``: its bucket through the chain before the wire, a tensor a
    technique appends to it (``call.appended``) after it."""
    wire = call.bucket
    for technique in call.state.techniques:
        wire = technique.before_wire(call, wire)
    return wire if call.appended is None else torch.cat((wire, call.appended))


def after_collective(call: BucketCall, results: list[torch.Tensor]) -> torch.Tensor:
    """The result of ``call`` from the collectives' ``results`` (the main one first, then
    those of ``call.extra`` in order): an appended tensor's sum split off, then every
    technique's ``after_collective`` in reverse chain order."""
    out = results[0]
    if call.appended is not None:
        numel = call.record.layout.numel
        out, call.appended_result = out[:numel], out[numel:]
    call.results = results
    for technique in reversed(call.state.techniques):
        out = technique.after_collective(call, out)
    return out

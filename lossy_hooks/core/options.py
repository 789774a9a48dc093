"""The settings of :class:`~lossy_hooks.LossyState`, their allowed values, and every check of
how they combine: each bad value or combination raises ``ValueError`` naming the option and
what is allowed, before any bucket is touched."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lossy_hooks.core.encoding import DEFAULT_HADAMARD_BLOCK, ENCODINGS, WIRE_DTYPES
from lossy_hooks.loss_models import Bernoulli, DeadlineLoss

if TYPE_CHECKING:
    from lossy_hooks.core.state import LossyState

__all__ = [
    "AUTO_REGENERATE_MAX_WORLD",
    "COUNTS_TRANSPORTS",
    "DROP_POINTS",
    "ENCODINGS",
    "FILLS",
    "NOT_REACHED",
    "OPTION_DEFAULTS",
    "PACKETIZATIONS",
    "POST_SYNCS",
    "REDUCTIONS",
    "WIRE_DTYPES",
    "check_combinations",
    "choice",
    "protect_rule",
    "resolve_counts_transport",
    "unused_settings",
    "whole",
]

DROP_POINTS = ("worker", "post", "both")
FILLS = ("zero", "rescale", "stale")
REDUCTIONS = ("mean", "sum")
POST_SYNCS = ("shared", "independent")
PACKETIZATIONS = ("mtu", "tensor")
COUNTS_TRANSPORTS = ("auto", "separate", "append", "regenerate")

ProtectRule = Callable[[str, torch.Tensor], bool]


def choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def whole(name: str, value: Any, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def power_of_two(name: str, value: Any) -> int:
    n = whole(name, value, 2, "a power of two >= 2")
    if n & (n - 1):
        raise ValueError(f"{name} must be a power of two >= 2, got {value!r}")
    return n


def protect_rule(protect: str | ProtectRule | None) -> ProtectRule | None:
    """``protect`` as a predicate ``(parameter name, parameter) -> bool``: a regular
    expression is searched in the name (``"bias|norm|bn"``); a callable is used as it is."""
    if protect is None or callable(protect):
        return protect
    if not isinstance(protect, str) or not protect:
        raise ValueError(
            f"protect must be a name pattern (regular expression) or a predicate, got {protect!r}"
        )
    try:
        pattern = re.compile(protect)
    except re.error as e:
        raise ValueError(f"protect: {protect!r} is not a regular expression ({e})") from None
    return lambda name, _param: pattern.search(name) is not None


def check_combinations(state: LossyState) -> None:
    """Combinations of settings that have no meaning, refused with the reason."""
    drop, fill = state.drop_point, state.fill
    if fill == "stale" and drop != "post":
        raise ValueError(
            f"fill='stale' needs drop_point='post' (a worker's lost contribution has no "
            f"previous value at the receiver); got drop_point={drop!r}"
        )
    if fill == "rescale" and state.drops_after and state.post_keep_rate <= 0.0:
        raise ValueError(
            "fill='rescale' after the allreduce needs a long-run loss rate < 1 "
            f"(rescales survivors by 1/(1-p)); {state.loss_model.spec!r} loses every packet"
        )
    if state.error_feedback:
        if not state.drops_before:
            raise ValueError(
                f"error_feedback resends what a worker's uplink lost: it needs drop_point='worker' or "
                f"'both', got {drop!r}"
            )
        if fill != "zero":
            raise ValueError(
                f"error_feedback needs fill='zero' (rescale already compensates the loss in expectation; "
                f"both together count it twice), got fill={fill!r}"
            )
    if state.encoding == "hadamard":
        if state.packetization == "tensor":
            raise ValueError(
                "encoding='hadamard' needs packetization='mtu' (rotated packets have no tensors)"
            )
        if fill == "stale":
            raise ValueError(
                "encoding='hadamard' cannot use fill='stale': the rotation is new at every step, so a "
                "previous step's packet is not comparable"
            )
        if state.error_feedback:
            raise ValueError(
                "error_feedback with encoding='hadamard' is not supported (residuals would need a decode)"
            )
    if isinstance(state.loss_model, DeadlineLoss):
        if state.network is None:
            raise ValueError(
                "the deadline loss model needs network=NetworkModel(...) (train_ddp.py: --bandwidth_gbps "
                "and the other network flags): the losses come from the simulated arrival times"
            )
        if drop == "both":
            raise ValueError(
                "the deadline loss model loses packets of one traversal of the network: use "
                "drop_point='worker' or 'post', not 'both'"
            )
        if state.packetization != "mtu":
            raise ValueError(
                "the deadline loss model needs packetization='mtu' (the clock prices packets of mtu bytes)"
            )
        if state.protection.active or state.protect is not None:
            raise ValueError(
                "the deadline loss model with fec, retransmit or protect is not supported: the "
                "deadline transport does not resend (the reliable transport is priced on the same clock)"
            )
    post_rescale = fill == "rescale" and state.drops_after
    if post_rescale and state.protection.active and not isinstance(state.loss_model, Bernoulli):
        raise ValueError(
            "fill='rescale' after the allreduce with fec or retransmit needs loss_rate / a Bernoulli "
            f"model (the kept fraction has a closed form only there); got {state.loss_model.spec!r}"
        )


# counts_transport="auto" regenerates on CPU up to this many ranks (see LossyState).
AUTO_REGENERATE_MAX_WORLD = 4
OPTION_DEFAULTS: dict[str, Any] = {
    "encoding": "none",
    "hadamard_block": DEFAULT_HADAMARD_BLOCK,
    "wire_dtype": "fp32",
    "error_feedback": False,
    "protect": None,
    "retransmit": 0,
    "fec": None,
}
NOT_REACHED = (
    "no gradient bucket has reached this LossyState yet: if training steps have run, the lossy "
    "hook is not registered on the DDP module that trains (registered on another module, or a "
    "framework that skipped it, e.g. Lightning's DDPStrategy on CPU), and nothing was lost; "
    "see README 'Where you already train'"
)


def unused_settings(cfg: dict[str, Any]) -> set[str]:
    """Settings without effect in configuration ``cfg`` (``hadamard_block`` unless
    ``encoding="hadamard"``): two configurations that differ only there are the same one (a
    checkpoint or run folder saved under another default of such a setting still resumes)."""
    return set() if cfg.get("encoding", OPTION_DEFAULTS["encoding"]) == "hadamard" else {"hadamard_block"}


def resolve_counts_transport(requested: str, device: torch.device, world_size: int) -> str:
    """The counts transport ``"auto"`` stands for: ``"regenerate"`` on CPU with at most
    ``AUTO_REGENERATE_MAX_WORLD`` ranks (an extra Gloo collective costs more there than
    sampling ``W`` masks), ``"separate"`` otherwise (on GPUs a few-kB NCCL allreduce is cheap
    and ``W`` x the sampling is not free at large ``W``). Any other choice is returned as is."""
    if requested != "auto":
        return requested
    small_cpu = device.type == "cpu" and world_size <= AUTO_REGENERATE_MAX_WORLD
    return "regenerate" if small_cpu else "separate"


def _exact_count_limit(dtype: torch.dtype) -> int:
    """The largest ``W`` such that every whole number ``0..W`` is exact in ``dtype``."""
    return round(2 / torch.finfo(dtype).eps) if dtype.is_floating_point else 2**31 - 1

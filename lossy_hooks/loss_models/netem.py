"""Loss models from netem-style text (``tc qdisc ... netem loss ...``)."""

from __future__ import annotations

from lossy_hooks.loss_models.base import LossModel
from lossy_hooks.loss_models.deadline import DeadlineLoss
from lossy_hooks.loss_models.markov import GilbertElliott, MarkovFourState
from lossy_hooks.loss_models.memoryless import Bernoulli, ExactCount, TailDrop, Trace

__all__ = ["LOSS_MODEL_SYNTAX", "parse_loss_model"]


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


LOSS_MODEL_SYNTAX = (
    "random P | state P13 [P31 [P32 [P23 [P14]]]] | gemodel P [R [1-H [1-K]]] | "
    "exact P | tail P | trace FILE | deadline D  (percentages in [0%, 100%] as in tc-netem: '5%' "
    "or '5'; D > 0: a multiple of the loss-free collective time, 1.5x, or a time, 800us / 2ms, "
    "or 'adaptive [median | pNN] [last=K] [cap=Xx]')"
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
        deadline D                        -> DeadlineLoss(D): D = 1.5x (of the loss-free time) or 800us
        deadline adaptive [median|pNN] [last=K] [cap=Xx] -> DeadlineLoss(AdaptiveDeadline(...))

    Numbers are percentages as in ``tc``: ``5%`` and ``5`` both mean 0.05.
    """
    tokens = spec.split()
    if tokens and tokens[0] == "loss":
        tokens = tokens[1:]
    if not tokens:
        raise ValueError(f"loss model is empty; expected one of: {LOSS_MODEL_SYNTAX}")
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
    if kind == "deadline":
        nargs(1, 4)
        return DeadlineLoss(" ".join(args))
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
    raise ValueError(f"unknown loss model {kind!r} in {spec!r}; expected one of: {LOSS_MODEL_SYNTAX}")

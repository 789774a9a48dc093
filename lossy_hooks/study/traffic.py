"""Traffic beyond data parallelism (issue 43): which training traffic tolerates loss.

A run with model parallelism has traffic of its own besides the data-parallel gradients:
tensor parallelism's activation and activation-gradient all-reduces (``--tp``), pipeline
parallelism's activations and their gradients between stages (``--pp``: point-to-point) and
expert parallelism's dispatch and combine all-to-alls, forward and backward (``--ep``). Each
type of a run
travels on a :func:`~lossy_hooks.lossy_subgroups` group with a
:class:`~lossy_hooks.LossyState` of its own, made whether or not it loses (a loss-0 state
counts its packets: metrics.csv's ``<type>_packets_sent`` is there for every run with that
type):

- ``--traffic_loss TYPE=RATE[,TYPE=RATE...]``: RATE a fraction in [0, 1] (``0.05``), a
  percentage (``5%``), or a netem loss model text (``gemodel 1% 20%``, as ``--loss_model``;
  a plain number is a fraction here, not netem's percentage). A type the run does not have is
  refused, naming the flag that would give it (``pp=1%`` without ``--pp``).
- ``--traffic_fill zero|stale|rescale``: one fill for every lossy type (default ``zero``).
  ``zero`` and ``rescale`` lose at the senders (drop point ``worker``), ``stale`` at the
  receivers (drop point ``post``, one mask for the group: every rank of it keeps the same
  value). ``rescale`` needs every collective of the type to be a sum: tensor parallelism's
  group loses all-gathers too, pipeline and expert traffic is delivered, not summed
  (:data:`TRAFFIC_KINDS`), so it is refused for all three types.
- Seeds: a type's state has the seed ``derive_seed(round seed, <its Stream>, group)``,
  ``group`` the index of this rank's group of that type
  (:meth:`~lossy_hooks.study.mesh.MeshShape.group_index`: every rank of a group draws the
  same sequence, each group its own): its own streams
  (:class:`~lossy_hooks.core.streams.Stream`). The states are checkpointed with the round.
"""

from __future__ import annotations

import math
from typing import Any

from lossy_hooks.core.state import LossyState
from lossy_hooks.core.streams import Stream, derive_seed
from lossy_hooks.group import check_group_state
from lossy_hooks.loss_models import Bernoulli, LossModel, parse_loss_model
from lossy_hooks.study.mesh import MeshShape

__all__ = [
    "TRAFFIC_FILLS",
    "TRAFFIC_KINDS",
    "TRAFFIC_TYPES",
    "canonical",
    "parse_traffic_loss",
    "run_traffic_types",
    "traffic_counts",
    "traffic_problem",
    "traffic_states",
]

# type -> (the flag that gives a run this traffic, what it is)
TRAFFIC_TYPES = {
    "tp": ("--tp", "tensor-parallel"),
    "pp": ("--pp", "pipeline-parallel"),
    "ep": ("--ep", "expert-parallel"),
}
# the collectives each type's lossy group loses
TRAFFIC_KINDS = {
    "tp": ("all_reduce", "all_gather", "reduce_scatter"),
    "pp": ("p2p",),
    "ep": ("all_to_all",),
}
TRAFFIC_STREAMS = {"tp": Stream.TRAFFIC_TP, "pp": Stream.TRAFFIC_PP, "ep": Stream.TRAFFIC_EP}
TRAFFIC_FILLS = ("zero", "stale", "rescale")
_REDUCTIONS = frozenset({"all_reduce", "reduce_scatter"})


def _rate_model(text: str) -> LossModel:
    """``0.05`` (a fraction), ``5%`` (a percentage), or a netem loss model text."""
    number = text[:-1] if text.endswith("%") else text
    try:
        value = float(number)
    except ValueError:
        return parse_loss_model(text)
    p = value / 100 if text.endswith("%") else value
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"a rate must be in [0, 1] (or 0% to 100%), got {text!r}")
    return Bernoulli(p)


def parse_traffic_loss(text: str) -> dict[str, LossModel]:
    """``TYPE=RATE[,TYPE=RATE...]`` as ``{type: loss model}``; ``ValueError`` naming what is
    wrong (no ``=``, an unknown or repeated type, a bad rate or loss model)."""
    out: dict[str, LossModel] = {}
    for item in (s.strip() for s in text.split(",")):
        kind, sep, rate = (x.strip() for x in item.partition("="))
        if not sep or not kind or not rate:
            raise ValueError(f"expected TYPE=RATE[,TYPE=RATE...], got {item!r}")
        if kind not in TRAFFIC_TYPES:
            raise ValueError(f"unknown traffic type {kind!r} (types: {', '.join(TRAFFIC_TYPES)})")
        if kind in out:
            raise ValueError(f"traffic type {kind!r} given twice")
        try:
            out[kind] = _rate_model(rate)
        except ValueError as e:
            raise ValueError(f"{kind}={rate}: {e}") from None
    return out


def canonical(models: dict[str, LossModel]) -> str:
    """The configuration's text of parsed ``--traffic_loss``: ``tp=random 10%`` (types in
    :data:`TRAFFIC_TYPES` order, each model's netem spec)."""
    return ",".join(f"{k}={models[k].spec}" for k in TRAFFIC_TYPES if k in models)


def run_traffic_types(cfg: dict[str, Any]) -> list[str]:
    """The traffic types a configuration has (each with its flag ``--tp``, ``--pp``, ``--ep``
    > 1)."""
    return [t for t in TRAFFIC_TYPES if int(cfg.get(t) or 1) > 1]


def _state_kwargs(kind: str, model: LossModel, fill: str, mtu: int, seed: int) -> dict[str, Any]:
    """The :class:`LossyState` arguments of traffic ``kind``: stale loses at the receivers,
    with one mask per group (every rank keeps the same value), the others at the senders."""
    drop_point = "post" if fill == "stale" else "worker"
    return dict(loss_model=model, fill=fill, drop_point=drop_point, mtu=mtu, seed=seed)


def traffic_problem(cfg: dict[str, Any]) -> str | None:
    """Why ``--traffic_loss`` / ``--traffic_fill`` of a configuration are refused (a message
    naming the flag), or ``None``. Reads ``traffic_loss`` as given on the command line."""
    text, fill = cfg.get("traffic_loss"), cfg.get("traffic_fill", "zero")
    if text is None:
        if fill != "zero":
            return f"--traffic_fill {fill} needs --traffic_loss (no traffic type loses packets)"
        return None
    try:
        models = parse_traffic_loss(text)
    except ValueError as e:
        return f"--traffic_loss: {e}"
    has = run_traffic_types(cfg)
    for kind in models:
        if kind not in has:
            flag, what = TRAFFIC_TYPES[kind]
            return f"--traffic_loss {kind}: this run has no {what} traffic (it needs {flag} > 1)"
        delivered = sorted(set(TRAFFIC_KINDS[kind]) - _REDUCTIONS)
        if fill == "rescale" and delivered:
            return (
                f"--traffic_fill rescale: {kind} traffic's group loses {', '.join(delivered)} too "
                "(delivered, not summed: a lost packet has no copy to average); use zero or stale"
            )
        try:
            state = LossyState(**_state_kwargs(kind, models[kind], fill, cfg["mtu"], 0))
            check_group_state(state, TRAFFIC_KINDS[kind])
        except ValueError as e:
            return f"--traffic_loss {kind}: {e}"
    return None


def traffic_states(cfg: dict[str, Any], seed: int, shape: MeshShape, rank: int) -> dict[str, LossyState]:
    """One :class:`LossyState` per traffic type of the run (loss 0 where ``--traffic_loss``
    leaves it out), seeded ``derive_seed(seed, <type's stream>, index)``, ``index`` that of
    ``rank``'s group of that type in ``shape`` (:meth:`MeshShape.group_index`: with one
    parallelism ``rank // size``)."""
    text = cfg.get("traffic_loss")
    models = parse_traffic_loss(text) if text else {}
    fill = cfg.get("traffic_fill", "zero") if text else "zero"
    states = {}
    for kind in run_traffic_types(cfg):
        model = models.get(kind, Bernoulli(0.0))
        kind_fill = fill if kind in models else "zero"
        stream_seed = derive_seed(seed, TRAFFIC_STREAMS[kind], shape.group_index(kind, rank))
        states[kind] = LossyState(**_state_kwargs(kind, model, kind_fill, cfg["mtu"], stream_seed))
    return states


def traffic_counts(states: dict[str, LossyState], epoch: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Packets of each traffic type since the previous call, over every rank and every
    collective kind of the type (a collective: every rank calls it, in the same order):
    metrics.csv's ``<type>_packets_sent``, ``<type>_packets_lost`` and ``<type>_loss_rate``,
    and buckets.csv rows that say which traffic lost what, one per type and collective kind
    (``drop_point`` the type, ``bucket`` the kind: ``all_reduce``, ``all_gather``,
    ``reduce_scatter``, ``p2p``, ``all_to_all``; a kind the epoch did not use has none)."""
    columns: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for kind, state in states.items():
        counts = state.ledger.since_mark({}, all_ranks=True).get("collectives", {})
        sent = sum(int(c["packets_sent"]) for c in counts.values())
        lost = sum(int(c["packets_lost"]) for c in counts.values())
        columns |= {
            f"{kind}_packets_sent": sent,
            f"{kind}_packets_lost": lost,
            f"{kind}_loss_rate": lost / sent if sent else 0.0,
        }
        for collective in sorted(counts):
            c_sent, c_lost = int(counts[collective]["packets_sent"]), int(counts[collective]["packets_lost"])
            rows.append(
                {"epoch": epoch, "drop_point": kind, "bucket": collective}
                | {
                    "packets_sent": c_sent,
                    "packets_lost": c_lost,
                    "loss_rate": c_lost / c_sent if c_sent else 0.0,
                }
            )
    return columns, rows

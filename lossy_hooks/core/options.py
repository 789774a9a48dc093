"""The settings of :class:`~lossy_hooks.LossyState` in one frozen dataclass,
:class:`LossConfig`: every setting, its default, its allowed values, every check of how
settings combine (each bad value or combination raises ``ValueError`` naming the setting and
what is allowed, before any bucket is touched), and what the FSDP collectives refuse. The
hook's state, the study CLI, run-folder names, pickling and checkpoints read it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lossy_hooks.core.network import NetworkModel
from lossy_hooks.core.placement import ALGORITHMS, LinkRules, Placement, parse_link_loss, placement_of
from lossy_hooks.core.techniques import FILLS as FILL_TECHNIQUES
from lossy_hooks.core.techniques import Fill, Protection, fill_of, refusals
from lossy_hooks.core.techniques.hadamard import DEFAULT_HADAMARD_BLOCK, ENCODINGS
from lossy_hooks.core.techniques.protect import ProtectRule, protect_rule
from lossy_hooks.core.techniques.wire_dtype import WIRE_DTYPES
from lossy_hooks.loss_models import (
    Bernoulli,
    LossModel,
    check_probability,
    parse_loss_model,
    rate_or_none,
)

__all__ = [
    "ALGORITHMS",
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
    "LossConfig",
    "check_append_counts",
    "check_combinations",
    "choice",
    "exact_count_limit",
    "protect_rule",
    "resolve_counts_transport",
    "unused_settings",
    "whole",
]

DROP_POINTS = ("worker", "post", "both")
FILLS = tuple(FILL_TECHNIQUES)
REDUCTIONS = ("mean", "sum")
POST_SYNCS = ("shared", "independent")
PACKETIZATIONS = ("mtu", "tensor")
COUNTS_TRANSPORTS = ("auto", "separate", "append", "regenerate")


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


def check_combinations(config: LossConfig) -> None:
    """Combinations of settings that have no meaning, refused with the reason: what the
    techniques ``config`` uses refuse (:func:`~lossy_hooks.core.techniques.refusals`), then
    what its loss model refuses (``LossModel.refuses``), then what its placement refuses
    (``Placement.refuses``)."""
    for reason in (*refusals(config), config.loss_model.refuses(config), config.placement.refuses(config)):
        if reason is not None:
            raise ValueError(reason)


# counts_transport="auto" regenerates on CPU up to this many ranks (see LossyState).
AUTO_REGENERATE_MAX_WORLD = 4


def _meta(group: str = "core", fsdp: str | None = None, all_gather: str | None = None) -> dict[str, Any]:
    """A :class:`LossConfig` field's metadata: ``group`` ``"core"`` (always in
    :meth:`LossConfig.as_dict`), ``"option"`` (there only when not at its default:
    configurations saved before the option existed name the same run), ``"network"``,
    ``"runtime"`` or ``"derived"`` (computed from the others); ``fsdp``: why the FSDP
    collectives (reduce-scatter and all-gather) refuse any value but the default,
    ``all_gather``: why the all-gather alone does (``None``: they honour it)."""
    return {"group": group, "fsdp": fsdp, "all_gather": all_gather}


@dataclass(frozen=True, eq=False)
class LossConfig:
    """Every setting of a lossy collective, checked at construction (see
    :class:`~lossy_hooks.LossyState` for what each one means); ``loss_model`` also takes
    netem-style text. :meth:`from_arguments` adds ``LossyState``'s ``loss_rate`` shorthand."""

    loss_model: LossModel = field(default=None, metadata=_meta())  # type: ignore[assignment]
    mtu: int = field(default=1500, metadata=_meta())
    drop_point: str = field(default="worker", metadata=_meta())
    fill: str = field(default="rescale", metadata=_meta())
    reduction: str = field(default="mean", metadata=_meta())
    post_sync: str = field(default="shared", metadata=_meta())
    packetization: str = field(
        default="mtu", metadata=_meta("core", "shards are flat rows of elements: packetization must be 'mtu'")
    )
    seed: int = field(default=0, metadata=_meta())
    counts_transport: str = field(default="auto", metadata=_meta())
    measure_fidelity: bool = field(
        default=False,
        metadata=_meta("core", all_gather="an all-gather delivers shards: there is no sum to compare"),
    )
    encoding: str = field(
        default="none",
        metadata=_meta(
            "option", all_gather="the technique chain runs on reductions, not on delivered shards"
        ),
    )
    hadamard_block: int = field(default=DEFAULT_HADAMARD_BLOCK, metadata=_meta("option"))
    wire_dtype: str = field(
        default="fp32",
        metadata=_meta(
            "option", all_gather="use FSDP's own MixedPrecisionPolicy(param_dtype=torch.bfloat16)"
        ),
    )
    error_feedback: bool = field(default=False, metadata=_meta("option"))
    protect: str | ProtectRule | None = field(
        default=None,
        metadata=_meta("option", "protection matches parameters in a DDP bucket; FSDP rows are flat shards"),
    )
    retransmit: int = field(default=0, metadata=_meta("option"))
    fec: tuple[int, int] | None = field(
        default=None, metadata=_meta("option", "FEC groups are laid over a bucket's packets, not per row")
    )
    network: NetworkModel | None = field(
        default=None,
        metadata=_meta(
            "network", "the simulated clock prices an all-reduce's phases, not FSDP's collectives"
        ),
    )
    # where packets are lost: the collective's algorithm (core/placement), which links lose
    algorithm: str = field(default="ps", metadata=_meta("option"))  # FSDP: Placement.fsdp_refuses
    ranks_per_node: int | None = field(default=None, metadata=_meta("option"))
    link_loss: Any = field(default=None, metadata=_meta("option"))
    # the placement object (default: the one ``algorithm`` names; a test may give its own)
    placement: Placement = field(default=None, metadata=_meta("runtime"))  # type: ignore[assignment]
    # derived from the settings above at construction
    post_keep_rate: float = field(init=False, repr=False, metadata=_meta("derived"))  # 1 - long-run loss
    protect_rule: ProtectRule | None = field(init=False, repr=False, metadata=_meta("derived"))
    protection: Protection = field(init=False, repr=False, metadata=_meta("derived"))  # FEC, retransmit
    fill_technique: Fill = field(init=False, repr=False, metadata=_meta("derived"))  # FILLS[fill]
    link_rules: LinkRules = field(init=False, repr=False, metadata=_meta("derived"))  # per-link loss

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name, allowed in (
            ("drop_point", DROP_POINTS),
            ("fill", FILLS),
            ("reduction", REDUCTIONS),
            ("post_sync", POST_SYNCS),
            ("packetization", PACKETIZATIONS),
            ("counts_transport", COUNTS_TRANSPORTS),
        ):
            choice(name, getattr(self, name), allowed)
        put("mtu", whole("mtu", self.mtu, 1, "a positive whole number of bytes"))
        put("seed", whole("seed", self.seed, 0, "a non-negative integer"))
        model = self.loss_model
        model = (
            Bernoulli(0.0) if model is None else parse_loss_model(model) if isinstance(model, str) else model
        )
        if not isinstance(model, LossModel):
            raise ValueError(f"loss_model must be a LossModel or netem-style text, got {model!r}")
        put("loss_model", model)
        put("post_keep_rate", 1.0 - model.long_run_loss_rate())
        choice("encoding", self.encoding, ENCODINGS)
        put("hadamard_block", power_of_two("hadamard_block", self.hadamard_block))
        choice("wire_dtype", self.wire_dtype, tuple(WIRE_DTYPES))
        put("error_feedback", bool(self.error_feedback))
        put("measure_fidelity", bool(self.measure_fidelity))
        put("protect_rule", protect_rule(self.protect))
        put("protection", Protection(self.retransmit, self.fec))
        put("retransmit", self.protection.retransmit)
        put("fec", self.protection.fec)
        if self.network is not None and not isinstance(self.network, NetworkModel):
            raise ValueError(f"network must be a NetworkModel, got {self.network!r}")
        put("fill_technique", fill_of(self))
        choice("algorithm", self.algorithm, ALGORITHMS)
        if self.placement is None:
            put("placement", placement_of(self.algorithm))
        if self.ranks_per_node is not None:
            put(
                "ranks_per_node",
                whole("ranks_per_node", self.ranks_per_node, 1, "a whole number of ranks >= 1"),
            )
        put("link_loss", parse_link_loss(self.link_loss) or None)
        put("link_rules", LinkRules(self.ranks_per_node, self.link_loss or ()))
        check_combinations(self)

    @classmethod
    def from_arguments(
        cls, loss_rate: float | None = None, loss_model: LossModel | str | None = None, **settings: Any
    ) -> LossConfig:
        """``LossyState``'s arguments: ``loss_rate`` (a Bernoulli model) or ``loss_model``."""
        if loss_model is not None and loss_rate is not None:
            raise ValueError("give loss_rate or loss_model, not both")
        if loss_model is None:
            loss_model = Bernoulli(check_probability("loss_rate", 0.0 if loss_rate is None else loss_rate))
        return cls(loss_model=loss_model, **settings)

    @classmethod
    def names(cls, group: str) -> tuple[str, ...]:
        """The settings of ``group`` (``"core"``, ``"option"``, ``"network"``), in order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["group"] == group)

    def fsdp_refusal(self, collective: str = "reduce-scatter") -> tuple[str, Any, str] | None:
        """``(setting, value, reason)`` of the first setting away from its default that the
        FSDP ``collective`` (``"reduce-scatter"`` or ``"all-gather"``) does not do (the
        reasons are the fields' ``fsdp`` and ``all_gather`` metadata), or ``None``."""
        plain = self.options()
        for f in dataclasses.fields(self):
            why = f.metadata["fsdp"] or (f.metadata["all_gather"] if collective == "all-gather" else None)
            if why and getattr(self, f.name) != f.default:
                return f.name, plain.get(f.name, getattr(self, f.name)), why
        return None

    @property
    def protecting(self) -> bool:
        """Whether a drop point's masks go through FEC, retransmission or protected packets."""
        return self.protection.active or self.protect is not None

    @property
    def drops_before(self) -> bool:
        """Whether packets are lost on the way to the sum (the placement's reduce phase)."""
        return self.placement.loses(self.drop_point, "reduce")

    @property
    def drops_after(self) -> bool:
        """Whether packets of the result are lost (the placement's broadcast phase)."""
        return self.placement.loses(self.drop_point, "broadcast")

    @property
    def shares_post_mask(self) -> bool:
        """Whether every rank misses the same packets of the result (``post_sync="shared"``
        on the parameter server: the mask is then folded in before the collective)."""
        return self.post_sync == "shared" and not self.placement.per_hop

    def options(self) -> dict[str, Any]:
        """The option settings as plain values (a predicate ``protect`` by its name)."""
        out = {name: getattr(self, name) for name in self.names("option")}
        if out["protect"] is not None and not isinstance(out["protect"], str):
            out["protect"] = getattr(out["protect"], "__qualname__", repr(out["protect"]))
        out["fec"] = None if out["fec"] is None else list(out["fec"])
        if out["link_loss"] is not None:
            out["link_loss"] = {f"{a}->{b}": m.spec for a, b, m in out["link_loss"]}
        return out

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain values (configs, run names, checkpoints): the core ones,
        the options not at their defaults, and the network's fields when there is one."""
        model = {"loss_model": self.loss_model.spec, "loss_rate": rate_or_none(self.loss_model)}
        core = model | {name: getattr(self, name) for name in self.names("core") if name != "loss_model"}
        options = {k: v for k, v in self.options().items() if v != OPTION_DEFAULTS[k]}
        network = {} if self.network is None else {"network": dataclasses.asdict(self.network)}
        return core | options | network

    def arguments(self) -> dict[str, Any]:
        """What rebuilds this configuration: ``LossConfig(**config.arguments())``."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata["group"] != "derived"
        }

    def differences(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{setting: (saved, now)}`` where a saved :meth:`as_dict` differs from this one
        (options missing there at their defaults; settings unused in both left out)."""
        mine, theirs = OPTION_DEFAULTS | self.as_dict(), OPTION_DEFAULTS | saved
        unused = unused_settings(mine) & unused_settings(theirs)
        keys = (mine.keys() | theirs.keys()) - unused
        return {k: (theirs.get(k), mine.get(k)) for k in keys if theirs.get(k) != mine.get(k)}


OPTION_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(LossConfig) if f.metadata["group"] == "option"
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


def exact_count_limit(dtype: torch.dtype) -> int:
    """The largest ``W`` such that every whole number ``0..W`` is exact in ``dtype``."""
    return round(2 / torch.finfo(dtype).eps) if dtype.is_floating_point else 2**31 - 1


def check_append_counts(world: int, wire: torch.dtype) -> None:
    """``counts_transport="append"`` sends the arrival counts in the wire dtype: refused for a
    group of more ranks than it counts exactly (:func:`exact_count_limit`)."""
    limit = exact_count_limit(wire)
    if world > limit:
        raise ValueError(
            f"counts_transport='append' sends arrival counts in the wire dtype ({wire}), "
            f"exact only up to {limit} ranks; this group has {world}: use "
            "counts_transport='separate' (int32 counts)"
        )

"""The settings of :class:`~lossy_hooks.LossyState` in one frozen dataclass, :class:`LossConfig`:
each setting declared once (default, meaning, unit, allowed values, collectives, refusals:
:mod:`lossy_hooks.core.declaration`), every check of how settings combine (a bad value or
combination raises ``ValueError`` naming the setting and what is allowed, before any bucket is
touched). The state, the study's flags and CLI, run names and checkpoints read it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from lossy_hooks.core.declaration import (
    DEADLINE_ON_DELIVERED,
    HOOK_ONLY,
    LINKS_ON_DELIVERED,
    REDUCED,
    RESCALE_ON_DELIVERED,
    SUM_ON_A_GROUP,
    WITH_GATHER,
    Setting,
    choice,
    derived,
    power_of_two,
    setting,
    settings_dataclass,
    whole,
)
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


@settings_dataclass
class LossConfig:
    """Every setting of a lossy collective, each declared once here: its field's default and
    :class:`~lossy_hooks.core.declaration.Setting` (meaning, unit, allowed values, the
    collectives it applies to, what refuses it), checked at construction; ``loss_model`` also
    takes netem-style text. :meth:`from_arguments` adds ``LossyState``'s ``loss_rate``."""

    loss_model: LossModel = setting(  # type: ignore[assignment]
        default=None,
        doc="which packets are lost: a LossModel (Bernoulli, ExactCount, GilbertElliott, MarkovFourState, "
        "TailDrop, Trace) or netem-style text ('gemodel 1% 20%', 'exact 5%', 'deadline 1.5x' with a "
        "network); None: loss_rate's Bernoulli model",
        allowed="a LossModel, netem-style text or None",
        refusals=(DEADLINE_ON_DELIVERED,),
    )
    mtu: int = setting(
        default=1500,
        doc="payload per packet: mtu // element size elements",
        unit="bytes",
        allowed="a positive whole number of bytes",
    )
    drop_point: str = setting(
        default="worker",
        doc="where packets are lost: worker (each rank's copy, before the collective), post (the result, "
        "after it) or both",
        allowed=DROP_POINTS,
        collectives=WITH_GATHER,
    )
    fill: str = setting(
        default="rescale",
        doc="what replaces a lost packet: zero; rescale (unbiased: the mean of the copies that arrived, or "
        "a received packet over the expected kept fraction); stale (its last received value, post only)",
        allowed=FILLS,
        refusals=(RESCALE_ON_DELIVERED,),
    )
    reduction: str = setting(
        default="mean",
        doc="DDP's mean of the ranks' contributions, or their sum",
        allowed=REDUCTIONS,
        collectives=REDUCED,
        refusals=(SUM_ON_A_GROUP,),
    )
    post_sync: str = setting(
        default="shared",
        doc="post drops: the same packets on every rank, or drawn per rank (replicas drift)",
        allowed=POST_SYNCS,
        collectives=WITH_GATHER,
    )
    packetization: str = setting(
        default="mtu",
        doc="mtu-sized packets, or one packet per parameter tensor (the original's granularity)",
        allowed=PACKETIZATIONS,
        collectives=HOOK_ONLY,
        fsdp="shards are flat rows of elements: packetization must be 'mtu'",
    )
    seed: int = setting(
        default=0,
        doc="worker masks from (seed, rank), shared post masks from seed",
        allowed="a non-negative integer",
    )
    counts_transport: str = setting(
        default="auto",
        doc="worker rescale: arrival counts by an extra small allreduce, appended to the bucket, or "
        "regenerated locally from every rank's seed (no communication); auto: regenerate on CPU "
        f"with <= {AUTO_REGENERATE_MAX_WORLD} ranks, else separate",
        allowed=COUNTS_TRANSPORTS,
        collectives=REDUCED,
    )
    measure_fidelity: bool = setting(
        default=False,
        doc="also compute the lossless aggregate; state.fidelity(): cosine and relative L2 per step",
        allowed="a bool",
        collectives=REDUCED,
        all_gather="an all-gather delivers shards: there is no sum to compare",
    )
    encoding: str = setting(
        default="none",
        doc="hadamard: send each bucket (each reduce-scatter row) rotated in blocks by a random-sign "
        "Hadamard transform",
        allowed=ENCODINGS,
        collectives=REDUCED,
        group="option",
        all_gather="the technique chain runs on reductions, not on delivered shards",
    )
    hadamard_block: int = setting(
        default=DEFAULT_HADAMARD_BLOCK,
        doc="Hadamard block (with encoding='hadamard')",
        unit="elements",
        allowed="a power of two >= 2",
        collectives=REDUCED,
        group="option",
    )
    wire_dtype: str = setting(
        default="fp32",
        doc="dtype of the packets: fp32 = the bucket's own; fp16/bf16 halve the bytes (mtu // 2 elements)",
        allowed=tuple(WIRE_DTYPES),
        collectives=REDUCED,
        group="option",
        all_gather="use FSDP's own MixedPrecisionPolicy(param_dtype=torch.bfloat16)",
    )
    error_feedback: bool = setting(
        default=False,
        doc="worker drop, zero fill: each rank resends what its uplink lost in its next step",
        allowed="a bool",
        collectives=REDUCED,
        group="option",
    )
    protect: str | ProtectRule | None = setting(
        default=None,
        doc="parameters whose packets are never lost, by name (call state.name_parameters(model))",
        allowed="a regex, a (name, param) -> bool predicate, or None",
        collectives=HOOK_ONLY,
        group="option",
        fsdp="protection matches parameters in a DDP bucket; FSDP rows are flat shards",
    )
    retransmit: int = setting(
        default=0,
        doc="resend a lost packet up to K times (K = retransmit), each try subject to the loss model",
        unit="tries",
        allowed="a whole number K >= 0; 0 = off",
        collectives=WITH_GATHER,
        group="option",
    )
    fec: tuple[int, int] | None = setting(
        default=None,
        doc="(g, r): r parity packets per g data packets (any g of g+r rebuild the group)",
        unit="packets",
        allowed="a pair of whole numbers >= 1, or None",
        collectives=HOOK_ONLY,
        group="option",
        fsdp="FEC groups are laid over a bucket's packets, not per row",
    )
    network: NetworkModel | None = setting(
        default=None,
        doc="price every collective on a simulated clock (state.clock); the network a deadline "
        "loss model loses packets on",
        allowed="a NetworkModel or None",
        collectives=HOOK_ONLY,
        group="network",
        fsdp="the simulated clock prices an all-reduce's phases, not FSDP's collectives",
    )
    algorithm: str = setting(  # FSDP: Placement.fsdp_refuses
        default="ps",
        doc="ps: one uplink before and one downlink after an opaque allreduce; ring / tree / dbtree "
        "/ direct: loss per link transmission of NCCL's ring, its (double) binary tree, or a transpose "
        "exchange (worker = the reduce phase's hops, post = the broadcast phase's)",
        allowed=ALGORITHMS,
        collectives=WITH_GATHER,
        group="option",
    )
    ranks_per_node: int | None = setting(
        default=None,
        doc="ranks r, s share a node when r // G == s // G: hops between them never lose",
        unit="ranks",
        allowed="a whole number of ranks >= 1, or None",
        group="option",
    )
    link_loss: Any = setting(
        default=None,
        doc="per-hop algorithms: a loss model of its own per directed link (a rate or netem text; "
        "wins over ranks_per_node), e.g. '3->4=5%; 0->1=gemodel 1% 20%' or {(3, 4): 0.05}",
        allowed="a mapping or text of links and loss models, or None",
        collectives=WITH_GATHER,
        group="option",
        refusals=(LINKS_ON_DELIVERED,),
    )
    placement: Placement = setting(  # type: ignore[assignment]
        default=None,
        doc="the placement object (default: the one algorithm names; a test may give its own)",
        allowed="a Placement or None",
        group="runtime",
    )
    post_keep_rate: float = derived(doc="1 - the loss model's long-run loss rate")
    protect_rule: ProtectRule | None = derived(doc="protect as a rule on parameter names")
    protection: Protection = derived(doc="FEC and retransmission, in order on a mask")
    fill_technique: Fill = derived(doc="the fill's technique (FILLS[fill])")
    link_rules: LinkRules = derived(doc="ranks_per_node and link_loss: the loss model of each link")

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for f in dataclasses.fields(self):  # the settings whose declaration lists choices
            declared = f.metadata["setting"]
            if declared.choices is not None:
                choice(f.name, getattr(self, f.name), declared.choices)
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
        put("hadamard_block", power_of_two("hadamard_block", self.hadamard_block))
        put("error_feedback", bool(self.error_feedback))
        put("measure_fidelity", bool(self.measure_fidelity))
        put("protect_rule", protect_rule(self.protect))
        put("protection", Protection(self.retransmit, self.fec))
        put("retransmit", self.protection.retransmit)
        put("fec", self.protection.fec)
        if self.network is not None and not isinstance(self.network, NetworkModel):
            raise ValueError(f"network must be a NetworkModel, got {self.network!r}")
        put("fill_technique", fill_of(self))
        if self.placement is None:
            put("placement", placement_of(self.algorithm))
        if self.ranks_per_node is not None:
            nodes = whole("ranks_per_node", self.ranks_per_node, 1, "a whole number of ranks >= 1")
            put("ranks_per_node", nodes)
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
    def declared(cls) -> dict[str, tuple[Any, Setting]]:
        """``{name: (default, declaration)}`` of every setting a user gives, in order (the
        ``core``, ``option`` and ``network`` groups: ``LossyState``'s arguments)."""
        fields = dataclasses.fields(cls)
        return {
            f.name: (f.default, f.metadata["setting"]) for f in fields if f.metadata["setting"].user_facing
        }

    @classmethod
    def names(cls, group: str) -> tuple[str, ...]:
        """The settings of ``group`` (``"core"``, ``"option"``, ``"network"``), in order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["setting"].group == group)

    def fsdp_refusal(self, collective: str = "reduce-scatter") -> tuple[str, Any, str] | None:
        """``(setting, value, reason)`` of the first setting away from its default that the
        FSDP ``collective`` (``"reduce-scatter"`` or ``"all-gather"``) does not do (the
        reasons are the declarations' ``fsdp``, and ``all_gather`` for the all-gather), or
        ``None``."""
        plain = self.options()
        for name, (default, declared) in self.declared().items():
            why = declared.fsdp or (declared.all_gather if collective == "all-gather" else None)
            if why and getattr(self, name) != default:
                return name, plain.get(name, getattr(self, name)), why
        return None

    def group_refusal(self, kinds: Iterable[str]) -> str | None:
        """Why a lossy process group of collective ``kinds`` refuses these settings (the
        first of the declarations' ``refusals`` that applies, naming the kinds that refuse
        it), or ``None``."""
        for name, (default, declared) in self.declared().items():
            for refusal in declared.refusals:
                refusing = sorted(set(kinds) & set(refusal.kinds))
                if refusing and refusal.refuses(getattr(self, name), default):
                    return refusal.message.format(kinds=", ".join(refusing))
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
            if f.metadata["setting"].group != "derived"
        }

    def differences(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{setting: (saved, now)}`` where a saved :meth:`as_dict` differs from this one
        (options missing there at their defaults; settings unused in both left out)."""
        mine, theirs = OPTION_DEFAULTS | self.as_dict(), OPTION_DEFAULTS | saved
        unused = unused_settings(mine) & unused_settings(theirs)
        keys = (mine.keys() | theirs.keys()) - unused
        return {k: (theirs.get(k), mine.get(k)) for k in keys if theirs.get(k) != mine.get(k)}


OPTION_DEFAULTS: dict[str, Any] = {
    name: default for name, (default, declared) in LossConfig.declared().items() if declared.group == "option"
}


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

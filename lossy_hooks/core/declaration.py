"""How one setting of a lossy collective is declared: a :class:`Setting` record in the
metadata of its :class:`~lossy_hooks.core.options.LossConfig` field (made by
:func:`setting`, next to its default), with its meaning, unit, allowed values, the collective
kinds it applies to, why FSDP's sharded collectives refuse a value other than its default
(``fsdp``), and what a lossy process group refuses for some of its kinds (``refusals``).

Derived from these records, nowhere written again: ``LossConfig``'s choice checks and
``fsdp_refusal``, ``LossyState``'s defaults and the "Arguments" section of its docstring
(:func:`arguments_doc`), the study's flags for the settings
(``lossy_hooks.study.flags.add_setting_flag``) and ``check_group_state``'s refusals of
settings (``lossy_hooks.group``)."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:  # a dependency of torch's
    from typing_extensions import dataclass_transform

from lossy_hooks.loss_models import DeadlineLoss

__all__ = [
    "COLLECTIVES",
    "DEADLINE_ON_DELIVERED",
    "DELIVERED",
    "GROUPS",
    "HOOK_ONLY",
    "LINKS_ON_DELIVERED",
    "REDUCED",
    "RESCALE_ON_DELIVERED",
    "SHARDED",
    "SUM_ON_A_GROUP",
    "USER_GROUPS",
    "WITH_GATHER",
    "Refusal",
    "Setting",
    "arguments_doc",
    "choice",
    "derived",
    "power_of_two",
    "setting",
    "settings_dataclass",
    "whole",
]

# the collective kinds a setting can apply to (lossy_hooks.group.KINDS, in its order)
COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast", "p2p")
REDUCED = ("all_reduce", "reduce_scatter")  # summed: copies to average, arrival counts
DELIVERED = ("all_gather", "all_to_all", "broadcast", "p2p")  # delivered, not reduced
SHARDED = ("reduce_scatter", "all_gather")  # FSDP's two collectives (Setting.fsdp)
# "core": always in LossConfig.as_dict; "option": there only off its default (so that a
# configuration saved before the option existed names the same run); "network"; "runtime"
# (an object given at run time, not a user's setting); "derived" (computed from the others)
GROUPS = ("core", "option", "network", "runtime", "derived")
USER_GROUPS = ("core", "option", "network")
HOOK_ONLY = ("all_reduce",)  # the DDP hook's all-reduce (and a lossy group's)
WITH_GATHER = (*REDUCED, "all_gather")  # drop points, placement, protections: FSDP's all-gather too


@dataclass(frozen=True)
class Refusal:
    """What a lossy process group refuses for its collective ``kinds``: the setting at one of
    ``values`` (a type: an instance of it; ``None``: any value but the default). ``message``
    says why; ``{kinds}`` in it stands for the chosen kinds that refuse it."""

    kinds: tuple[str, ...]
    message: str
    values: tuple[Any, ...] | type | None = None

    def refuses(self, value: Any, default: Any) -> bool:
        """Whether ``value`` (the setting's default being ``default``) is refused."""
        if self.values is None:
            return bool(value != default)
        if isinstance(self.values, type):
            return isinstance(value, self.values)
        return value in self.values


@dataclass(frozen=True)
class Setting:
    """One setting's declaration (see the module). ``allowed``: a tuple of the choices, or
    text of the range; ``collectives``: the kinds whose packets it changes; ``fsdp``: why
    FSDP's reduce-scatter and all-gather refuse a value other than the default, and
    ``all_gather``: why FSDP's all-gather alone does (``None``: they honour it)."""

    doc: str
    unit: str = ""
    allowed: str | tuple[str, ...] = ""
    collectives: tuple[str, ...] = COLLECTIVES
    group: str = "core"
    fsdp: str | None = None
    all_gather: str | None = None
    refusals: tuple[Refusal, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.collectives).union(*(r.kinds for r in self.refusals)) - set(COLLECTIVES)
        if self.group not in GROUPS or unknown:
            raise ValueError(f"Setting: group {self.group!r} or kinds {sorted(unknown)} unknown")

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The allowed values when they are a list of choices, else ``None``."""
        return self.allowed if isinstance(self.allowed, tuple) else None

    @property
    def allowed_text(self) -> str:
        """The allowed values as text (choices quoted, separated by commas)."""
        return ", ".join(map(repr, self.allowed)) if isinstance(self.allowed, tuple) else self.allowed

    @property
    def user_facing(self) -> bool:
        """Whether a user gives it (a ``LossyState`` argument): not runtime or derived."""
        return self.group in USER_GROUPS

    def refusal_notes(self) -> list[str]:
        """What refuses a value of this setting, as text: FSDP's collectives (``fsdp``), then
        the lossy process group's kinds (``refusals``, the kinds written out)."""
        fsdp = [f"FSDP's {' and '.join(SHARDED)} take only the default ({self.fsdp})"] if self.fsdp else []
        if self.all_gather:
            fsdp.append(f"FSDP's all_gather takes only the default ({self.all_gather})")
        return fsdp + ["lossy_group: " + r.message.format(kinds=", ".join(r.kinds)) for r in self.refusals]

    def help_text(self, note: str = "", allowed: bool = True) -> str:
        """The meaning, then ``note`` (a caller's addition), then unit and allowed values in
        brackets (the allowed ones unless ``allowed`` is false or they are choices, which the
        caller lists)."""
        text = "; ".join(filter(None, (self.doc, note)))
        shown = allowed and self.choices is None
        bracket = ", ".join(filter(None, (self.unit, self.allowed_text if shown else "")))
        return f"{text} [{bracket}]" if bracket else text


def setting(*, default: Any, doc: str, **declared: Any) -> Any:
    """A ``LossConfig`` field with its default and its :class:`Setting` (``doc`` and the
    other fields of ``Setting``)."""
    return field(default=default, metadata={"setting": Setting(doc, **declared)})


def derived(*, doc: str, init: Literal[False] = False) -> Any:
    """A ``LossConfig`` field computed at construction from the declared settings."""
    return field(init=init, repr=False, metadata={"setting": Setting(doc, collectives=(), group="derived")})


# a lossy process group's refusals of particular settings (each in its setting's declaration,
# LossConfig's ``refusals``; lossy_hooks.group.check_group_state raises them)
RESCALE_ON_DELIVERED = Refusal(
    DELIVERED,
    "fill='rescale' has no meaning for {kinds} (nothing is summed: a lost packet has no copy to "
    "average); use fill='zero' or 'stale', or leave these kinds out",
    ("rescale",),
)
DEADLINE_ON_DELIVERED = Refusal(
    DELIVERED,
    "a deadline loss model prices all-reduces on the simulated clock; it has no arrivals for "
    "{kinds}: use another loss model or leave these kinds out",
    DeadlineLoss,
)
LINKS_ON_DELIVERED = Refusal(
    DELIVERED,
    "link_loss applies to the hops of all_reduce and reduce_scatter; {kinds} honour "
    "ranks_per_node only: leave link_loss out or these kinds",
)
SUM_ON_A_GROUP = Refusal(
    COLLECTIVES,
    "reduction='sum' is the DDP hook's setting; on a group each call's op (SUM or AVG) says how "
    "it reduces: leave reduction at 'mean'",
    ("sum",),
)

T = TypeVar("T")


@dataclass_transform(frozen_default=True, field_specifiers=(field, setting, derived))
def settings_dataclass(cls: type[T]) -> type[T]:
    """``@dataclass(frozen=True, eq=False)`` of fields declared with :func:`setting` and
    :func:`derived` (type checkers and IDEs read their defaults through ``dataclass_transform``)."""
    return dataclass(frozen=True, eq=False)(cls)


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


def describe(name: str, kind: str, default: Any, declared: Setting) -> str:
    """One argument's entry in a docstring: name, type and default, then its declaration."""
    parts = [declared.doc]
    if declared.unit:
        parts.append(f"unit: {declared.unit}")
    parts.append(f"allowed: {declared.allowed_text}")
    kinds = "every kind" if declared.collectives == COLLECTIVES else ", ".join(declared.collectives)
    parts.append(f"applies to: {kinds}")
    parts += declared.refusal_notes()
    head = f"{name} ({kind}, default {default!r}): "
    return textwrap.fill(head + "; ".join(parts) + ".", width=92, subsequent_indent="    ")


def arguments_doc(entries: list[tuple[str, str, Any, Setting]], indent: str = "    ") -> str:
    """A docstring's "Arguments" section: one :func:`describe` entry per ``(name, type,
    default, declaration)``, indented by ``indent`` (the class body's)."""
    body = "\n".join(describe(*entry) for entry in entries)
    return "\n" + textwrap.indent("Arguments:\n" + textwrap.indent(body, "    "), indent) + "\n"

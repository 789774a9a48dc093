"""The settings of a :class:`~lossy_hooks.LossyState` read as its attributes (``state.fill``,
``state.mtu``, ``state.drops_before``), typed, for IDEs and type checkers: each a read-only
view of the one copy, ``state.settings`` (a :class:`~lossy_hooks.core.options.LossConfig`,
where each setting is declared, with its default and check, once). A test keeps this list
equal to LossConfig's fields."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lossy_hooks.core.network import NetworkModel
    from lossy_hooks.core.options import LossConfig
    from lossy_hooks.core.placement import LinkRules, Placement
    from lossy_hooks.core.techniques import Fill, Protection
    from lossy_hooks.core.techniques.protect import ProtectRule
    from lossy_hooks.loss_models import LossModel

__all__ = ["SettingsView"]


class SettingsView:
    """Read-only, typed views of ``self.settings`` (see the module)."""

    settings: LossConfig

    @property
    def loss_model(self) -> LossModel:
        return self.settings.loss_model

    @property
    def mtu(self) -> int:
        return self.settings.mtu

    @property
    def drop_point(self) -> str:
        return self.settings.drop_point

    @property
    def fill(self) -> str:
        return self.settings.fill

    @property
    def reduction(self) -> str:
        return self.settings.reduction

    @property
    def post_sync(self) -> str:
        return self.settings.post_sync

    @property
    def packetization(self) -> str:
        return self.settings.packetization

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def counts_transport(self) -> str:
        return self.settings.counts_transport

    @property
    def measure_fidelity(self) -> bool:
        return self.settings.measure_fidelity

    @property
    def encoding(self) -> str:
        return self.settings.encoding

    @property
    def hadamard_block(self) -> int:
        return self.settings.hadamard_block

    @property
    def wire_dtype(self) -> str:
        return self.settings.wire_dtype

    @property
    def error_feedback(self) -> bool:
        return self.settings.error_feedback

    @property
    def protect(self) -> str | ProtectRule | None:
        return self.settings.protect

    @property
    def retransmit(self) -> int:
        return self.settings.retransmit

    @property
    def fec(self) -> tuple[int, int] | None:
        return self.settings.fec

    @property
    def network(self) -> NetworkModel | None:
        return self.settings.network

    @property
    def algorithm(self) -> str:
        return self.settings.algorithm

    @property
    def ranks_per_node(self) -> int | None:
        return self.settings.ranks_per_node

    @property
    def link_loss(self) -> Any:
        return self.settings.link_loss

    @property
    def placement(self) -> Placement:
        return self.settings.placement

    @property
    def post_keep_rate(self) -> float:
        return self.settings.post_keep_rate

    @property
    def protect_rule(self) -> ProtectRule | None:
        return self.settings.protect_rule

    @property
    def protection(self) -> Protection:
        return self.settings.protection

    @property
    def fill_technique(self) -> Fill:
        return self.settings.fill_technique

    @property
    def link_rules(self) -> LinkRules:
        return self.settings.link_rules

    @property
    def drops_before(self) -> bool:
        return self.settings.drops_before

    @property
    def drops_after(self) -> bool:
        return self.settings.drops_after

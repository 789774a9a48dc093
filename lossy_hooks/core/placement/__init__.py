"""Where a collective loses packets (the placement seam, ``base.py``) and the placements:
``ps`` (``parameter_server.py``: one hop each way around the backend's opaque allreduce,
today's semantics) and the per-hop ones (``hops.py``), which lose per link transmission of
their algorithm's schedule (``schedule.py``): ``ring`` (``ring.py``), ``tree`` and ``dbtree``
(``tree.py``), ``direct`` (``direct.py``). ``links.py``: which links lose (``ranks_per_node``,
``link_loss``); ``hop_loss.py``: the per-link streams and one bucket's masks."""

from __future__ import annotations

from lossy_hooks.core.placement.base import PHASES_OF_DROP_POINT, LossSite, Phase, Placement
from lossy_hooks.core.placement.direct import Direct
from lossy_hooks.core.placement.hop_loss import HopLoss, HopMasks
from lossy_hooks.core.placement.hops import HopPlacement
from lossy_hooks.core.placement.links import LinkRules, link_name, parse_link_loss
from lossy_hooks.core.placement.parameter_server import ParameterServer
from lossy_hooks.core.placement.ring import Ring
from lossy_hooks.core.placement.schedule import Chunking, PhaseShape, path_products
from lossy_hooks.core.placement.tree import DoubleTree, Tree, binary_tree_parents

__all__ = [
    "ALGORITHMS",
    "PHASES_OF_DROP_POINT",
    "PLACEMENTS",
    "Chunking",
    "Direct",
    "DoubleTree",
    "HopLoss",
    "HopMasks",
    "HopPlacement",
    "LinkRules",
    "LossSite",
    "ParameterServer",
    "Phase",
    "PhaseShape",
    "Placement",
    "Ring",
    "Tree",
    "binary_tree_parents",
    "link_name",
    "parse_link_loss",
    "path_products",
    "placement_of",
]

PLACEMENTS: dict[str, type[Placement]] = {
    cls.name: cls for cls in (ParameterServer, Ring, Tree, DoubleTree, Direct)
}
ALGORITHMS = tuple(PLACEMENTS)


def placement_of(name: str) -> Placement:
    """The placement called ``name`` (one of :data:`PLACEMENTS`)."""
    if name not in PLACEMENTS:
        raise ValueError(f"algorithm must be one of {', '.join(map(repr, ALGORITHMS))}; got {name!r}")
    return PLACEMENTS[name]()

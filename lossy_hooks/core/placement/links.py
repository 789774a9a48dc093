r"""Which links of a per-hop placement lose, and how: the heterogeneous network.

* ``ranks_per_node = G``: ranks ``r`` and ``s`` share a node when ``r // G == s // G``; a
  hop between them is lossless (NVLink-like), only hops that cross nodes lose.
* ``link_loss``: per directed link, a loss model of its own ("one bad link" studies):
  ``{(3, 4): 0.05}`` (a Bernoulli rate), ``{"3->4": "gemodel 5% 30%"}`` (netem text) or a
  :class:`~lossy_hooks.loss_models.LossModel`; as text (the ``--link_loss`` flag),
  ``"3->4=5%; 0->1=gemodel 1% 20%"``. An override wins over ``ranks_per_node``.

Every other link runs a copy of the run's loss model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lossy_hooks.loss_models import Bernoulli, LossModel, check_probability, parse_loss_model

__all__ = ["LinkRules", "link_name", "parse_link_loss"]

Link = tuple[int, int]
LOSSLESS = Bernoulli(0.0)  # an intra-node hop
LinkOverride = tuple[int, int, LossModel]


def link_name(link: Link) -> str:
    """``"src->dst"``: how a link is written in stats, CSV rows and ``--link_loss``."""
    return f"{link[0]}->{link[1]}"


def _link_of(key: Any) -> Link:
    text = key if isinstance(key, str) else None
    if text is not None:
        m = re.fullmatch(r"\s*(\d+)\s*->\s*(\d+)\s*", text)
        if m is None:
            raise ValueError(f"link_loss: a link is written 'src->dst' (ranks), got {key!r}")
        return int(m[1]), int(m[2])
    if isinstance(key, tuple) and len(key) == 2 and all(isinstance(x, int) and x >= 0 for x in key):
        return int(key[0]), int(key[1])
    raise ValueError(f"link_loss: a link is a (src, dst) pair of ranks or 'src->dst', got {key!r}")


def _model_of(value: Any) -> LossModel:
    if isinstance(value, LossModel):
        return value
    if isinstance(value, str):
        text = value.strip()
        number = re.fullmatch(r"([0-9.eE+-]+)(%?)", text)
        if number is None:
            return parse_loss_model(text)
        value = float(number[1]) / (100.0 if number[2] else 1.0)
    return Bernoulli(check_probability("link_loss rate", value))


def parse_link_loss(
    spec: str | Mapping[Any, Any] | Iterable[LinkOverride] | None,
) -> tuple[LinkOverride, ...]:
    """The ``link_loss`` setting as sorted ``(src, dst, model)`` (see the module)."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        items: list[tuple[Any, Any]] = []
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            if "=" not in part:
                raise ValueError(f"link_loss: write 'src->dst=RATE' or 'src->dst=MODEL', got {part!r}")
            key, value = part.split("=", 1)
            items.append((key, value))
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = [((s, d), m) for s, d, m in spec]
    out: dict[Link, LossModel] = {}
    for key, value in items:
        link = _link_of(key)
        if link[0] == link[1]:
            raise ValueError(f"link_loss: {link_name(link)} is not a link (a rank to itself)")
        out[link] = _model_of(value)
    return tuple((s, d, m) for (s, d), m in sorted(out.items()))


@dataclass(frozen=True, eq=False)
class LinkRules:
    """``ranks_per_node`` and the ``link_loss`` overrides (see the module)."""

    ranks_per_node: int | None = None
    overrides: tuple[LinkOverride, ...] = ()

    def model_for(self, link: Link, base: LossModel) -> LossModel:
        """The loss model of ``link``: a copy of its own for a model with memory (its state is
        the link's), the model itself for a memoryless Bernoulli (nothing to keep per link)."""
        for s, d, model in self.overrides:
            if (s, d) == link:
                return model.clone()
        g = self.ranks_per_node
        if g is not None and link[0] // g == link[1] // g:
            return LOSSLESS
        return base if type(base) is Bernoulli else base.clone()  # memoryless: one shared copy

    def check(self, world: int, links: tuple[Link, ...], algorithm: str) -> None:
        """At the first bucket: every override names a link ``algorithm`` uses at ``world``."""
        used = set(links)
        for s, d, _ in self.overrides:
            if max(s, d) >= world:
                raise ValueError(f"link_loss names {link_name((s, d))}, but the group has {world} ranks")
            if (s, d) not in used:
                names = ", ".join(link_name(x) for x in sorted(used)[:12])
                raise ValueError(
                    f"link_loss names {link_name((s, d))}, which algorithm={algorithm!r} does not use "
                    f"at {world} ranks (its links: {names}{', ...' if len(used) > 12 else ''})"
                )

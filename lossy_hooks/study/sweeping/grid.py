"""From settings to the study script's flags: a grid's configurations (the Cartesian
product of its axes), ``{flag: value}`` as argv, and argv (the flags after a sweep's ``--``)
back as ``{flag: value}``. Boolean flags take true/false."""

from __future__ import annotations

import itertools
from typing import Any

__all__ = ["BOOLEAN_FLAGS", "MULTI_VALUE_FLAGS", "expand_grid", "flags_for", "parse_fixed", "parse_value"]

# train_ddp.py flags that take several values (--fec G R)
MULTI_VALUE_FLAGS = {"fec"}
BOOLEAN_FLAGS = {
    "use_zero",
    "use_avg",
    "worker_drop",
    "amp",
    "download",
    "measure_fidelity",
    "overwrite",
    "error_feedback",
    "sequence_parallel",
}


def parse_value(text: str) -> Any:
    """A value as written on a command line or in a grid: ``true``/``false`` a bool, then an
    int, a float, else the text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the grid, in the order given (last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def flags_for(settings: dict[str, Any]) -> list[str]:
    """train_ddp.py flags for ``{flag: value}``; booleans add or omit the flag; a list (or, for
    a flag taking several values such as ``fec``, a text with spaces: ``"8 1"``) gives
    several values."""
    out: list[str] = []
    for key, value in settings.items():
        name = "--" + key.lstrip("-")
        if key.lstrip("-") in BOOLEAN_FLAGS or isinstance(value, bool):
            if value:
                out.append(name)
        elif isinstance(value, (list, tuple)):
            out += [name, *map(str, value)]
        elif isinstance(value, str) and key.lstrip("-") in MULTI_VALUE_FLAGS:
            out += [name, *value.split()]
        else:
            out += [name, str(value)]
    return out


def parse_fixed(extra: list[str]) -> dict[str, Any]:
    """Flags after ``--`` as ``{flag: value}``: a flag alone is ``True``, a flag with several
    values (``--fec 8 1``) a list."""
    fixed: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        key = extra[i].lstrip("-")
        j = i + 1
        while j < len(extra) and not extra[j].startswith("--"):
            j += 1
        values = [parse_value(v) for v in extra[i + 1 : j]]
        fixed[key] = True if not values else values[0] if len(values) == 1 else values
        i = j
    return fixed

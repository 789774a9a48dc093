"""The optional dependencies of the study tools (``pyproject.toml``'s extras) and the one
error a tool gives when the extra it needs is not installed."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "require"]

# extra -> (the module it provides, what needs it)
EXTRAS = {
    "cluster": ("submitit", "sweep --executor slurm / submitit-local"),
    "tensorboard": ("tensorboard", "--tensorboard"),
}


class MissingExtraError(RuntimeError):
    """An optional dependency is missing; the message names the extra that installs it."""


def require(extra: str, module: str | None = None) -> ModuleType:
    """Import ``module`` (default: the extra's own module), or raise
    :class:`MissingExtraError` naming the extra and the command that installs it."""
    provided, user = EXTRAS[extra]
    name = module or provided
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingExtraError(
            f"{user} needs the '{extra}' extra ({provided} is not installed): "
            f"pip install 'lossy_hooks[{extra}]', or pip install -e '.[{extra}]' in a clone"
        ) from e

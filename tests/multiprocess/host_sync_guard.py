"""A context manager that makes every way a host sync can hide in Python code raise, for
the dynamic no-host-sync test (tests/multiprocess/hook_worker.py ``no_host_sync``).

On CPU nothing actually synchronises, so the guard patches the calls that *would* wait for
a GPU: ``Tensor.item``/``tolist``/``cpu``/``numpy``, ``bool(t)`` (``if t:``), ``int(t)``,
``float(t)``, ``torch.nonzero`` / ``Tensor.nonzero`` / one-argument ``torch.where`` (output
size unknown), boolean-mask indexing ``t[mask]`` (a nonzero inside), and ``print``.
Class-level patches: they hold in Gloo's worker threads too, where future callbacks run.
"""

from __future__ import annotations

import builtins
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

_LOCK = threading.Lock()
_INHERITED = object()


class HostSync(RuntimeError):
    pass


def _raiser(name: str):
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise HostSync(f"host sync: {name}")

    return fail


@contextlib.contextmanager
def forbid_host_sync() -> Iterator[list[str]]:
    """While active, the patched calls raise :class:`HostSync`; the names of the calls that
    were attempted are also appended to the yielded list (in case the exception is swallowed)."""
    seen: list[str] = []
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, replacement: Any) -> None:
        saved.append((owner, name, owner.__dict__.get(name, _INHERITED)))
        setattr(owner, name, replacement)

    def recording(name: str):
        fail = _raiser(name)

        def f(*args: Any, **kwargs: Any) -> Any:
            seen.append(name)
            return fail()

        return f

    getitem = torch.Tensor.__getitem__
    where = torch.where

    def guarded_getitem(self: torch.Tensor, index: Any) -> Any:
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            seen.append("bool-mask indexing")
            raise HostSync("host sync: bool-mask indexing")
        return getitem(self, index)

    def guarded_where(*args: Any, **kwargs: Any) -> Any:
        if len(args) + len(kwargs) == 1:
            seen.append("torch.where(cond)")
            raise HostSync("host sync: torch.where(cond)")
        return where(*args, **kwargs)

    with _LOCK:
        for name in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__"):
            patch(torch.Tensor, name, recording(f"Tensor.{name}"))
        patch(torch.Tensor, "__getitem__", guarded_getitem)
        patch(torch, "nonzero", recording("torch.nonzero"))
        patch(torch, "where", guarded_where)
        patch(builtins, "print", recording("print"))
    try:
        yield seen
    finally:
        with _LOCK:
            for owner, name, original in reversed(saved):
                if original is _INHERITED:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)

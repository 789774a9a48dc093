"""The lossy hook where users already train: one small module per framework, each importing
its framework only when used (the core package does not depend on any of them).

- :mod:`lossy_hooks.integrations.lightning`: ``LossyHookCallback`` for PyTorch Lightning
  (``pip install -e '.[lightning]'``).
- :mod:`lossy_hooks.integrations.accelerate`: ``register`` on what ``accelerator.prepare``
  returned (``.[accelerate]``).
- :mod:`lossy_hooks.integrations.hf_trainer`: ``register`` on a Hugging Face ``Trainer``
  (``.[transformers]``).

Each registers :func:`~lossy_hooks.lossy_allreduce_hook` on the framework's own
``DistributedDataParallel`` module, and checks after the first optimizer step that buckets
reached the state (:func:`check_hook_reached`), so a run never measures "20% loss" while
losing nothing.
"""

from __future__ import annotations

from typing import Any

from torch.nn.parallel import DistributedDataParallel

from lossy_hooks.core.state import LossyState
from lossy_hooks.hook import lossy_allreduce_hook

__all__ = ["HookNotReachedError", "check_hook_reached", "register_on_ddp"]


class HookNotReachedError(RuntimeError):
    """A LossyState was configured but no gradient bucket reached it."""


def register_on_ddp(model: Any, state: LossyState, framework: str) -> DistributedDataParallel:
    """Register the lossy hook on ``model``, which must be the framework's DDP module.

    Raises ``TypeError`` naming the framework when it did not wrap the model in DDP (one
    process, or another strategy such as FSDP or DeepSpeed): the hook needs DDP's buckets."""
    if not isinstance(state, LossyState):
        raise TypeError(f"{framework}: expected a LossyState, got {type(state).__name__}")
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(
            f"{framework}: the model is a {type(model).__name__}, not DistributedDataParallel, so "
            "there are no DDP buckets for the lossy hook: run with 2 or more processes "
            "(torchrun --nproc_per_node=N, or the framework's own launcher) and a DDP strategy"
        )
    if state.protect is not None and not state.parameter_names:  # protect= matches parameter names
        state.name_parameters(model.module)
    model.register_comm_hook(state, lossy_allreduce_hook)
    return model


def check_hook_reached(state: LossyState, framework: str) -> None:
    """Raise :class:`HookNotReachedError` if no bucket has reached ``state`` (call it after
    an optimizer step)."""
    if not state.hook_reached:
        raise HookNotReachedError(
            f"{framework}: an optimizer step ran but no gradient bucket reached the LossyState: "
            "the lossy hook is not registered on the DDP module that trains, and no packet "
            "was lost. " + _HOW
        )


_HOW = "Register it with lossy_hooks.integrations (README: 'Where you already train')."

"""How train_ddp.py parallelises a model (``--strategy ddp|fsdp``) and wires the lossy
communication into it; local gradient accumulation; whole-model checkpoints.

- ``ddp``: ``DistributedDataParallel`` with ``bucket_cap_mb``, the lossy allreduce hook.
- ``fsdp``: FSDP2 ``fully_shard`` on every transformer block of a GPT (every top-level child
  with parameters of another model), then on the model (the embeddings, final norm and
  head), and :func:`lossy_hooks.fsdp.register` for the lossy reduce-scatter and, with a
  gather state, the lossy all-gather. FSDP2's custom collectives need torch >= 2.10: the FSDP
  modules are imported only for ``fsdp`` (:func:`fsdp_api`), so ``ddp`` runs on older torch.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from lossy_hooks.core.state import LossyState
from lossy_hooks.hook import lossy_allreduce_hook

__all__ = [
    "FSDP_MIN_TORCH",
    "STRATEGIES",
    "fsdp_api",
    "full_state",
    "load_full_state",
    "no_grad_sync",
    "parallelize",
    "shard_units",
]

STRATEGIES = ("ddp", "fsdp")
FSDP_MIN_TORCH = "2.10"  # FSDP2's ReduceScatter / AllGather extension points (lossy_hooks.fsdp)


def fsdp_api() -> ModuleType:
    """:mod:`lossy_hooks.fsdp`, imported on first use; ``RuntimeError`` naming the torch
    version it needs when this torch lacks FSDP2's custom-collective API."""
    try:
        return importlib.import_module("lossy_hooks.fsdp")
    except ImportError as e:
        raise RuntimeError(
            f"--strategy fsdp needs torch >= {FSDP_MIN_TORCH} (FSDP2's fully_shard with custom "
            f"reduce-scatter and all-gather collectives); this is torch {torch.__version__} ({e}). "
            "--strategy ddp works on this torch."
        ) from None


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` wraps before the model itself: a GPT's blocks, else the
    top-level children that hold parameters."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return list(blocks)
    return [m for m in model.children() if any(True for _ in m.parameters())]


def parallelize(
    model: nn.Module,
    strategy: str,
    state: LossyState,
    gather: LossyState | None,
    device: torch.device,
    bucket_cap_mb: float,
) -> nn.Module:
    """The model to train, with the lossy collectives wired in."""
    if strategy == "ddp":
        ddp = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=bucket_cap_mb,
        )
        ddp.register_comm_hook(state, lossy_allreduce_hook)
        return ddp
    if strategy != "fsdp":
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    fsdp = fsdp_api()
    for unit in shard_units(model):
        fsdp.fully_shard(unit)
    fsdp.fully_shard(model)
    fsdp.register(model, state, all_gather=gather)
    return model


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, active: bool) -> Iterator[None]:
    """While ``active``, backward passes accumulate gradients locally (no collective):
    DDP's ``no_sync()``, FSDP's ``set_requires_gradient_sync(False)``."""
    if not active:
        yield
    elif isinstance(model, DDP):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole (unsharded) model and optimizer state on the CPU of rank 0 (empty on the
    other ranks). A collective under FSDP: every rank calls it."""
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, opt, options=_FULL)


def load_full_state(
    model: nn.Module, opt: torch.optim.Optimizer, model_sd: dict[str, Any], opt_sd: dict[str, Any]
) -> None:
    """Load what :func:`full_state` saved, sharding it again (every rank passes the whole)."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=options)
    set_optimizer_state_dict(model, opt, opt_sd, options=options)

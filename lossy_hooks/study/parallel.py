"""How train_ddp.py parallelises a model (``--strategy ddp|fsdp``) and wires the lossy
communication into it; local gradient accumulation; whole-model checkpoints.

- ``ddp``: ``DistributedDataParallel`` with ``bucket_cap_mb``, the lossy allreduce hook.
- ``fsdp``: FSDP2 ``fully_shard`` on every transformer block of a GPT (every top-level child
  with parameters of another model), then on the model (the embeddings, final norm and
  head), and :func:`lossy_hooks.fsdp.register` for the lossy reduce-scatter and, with a
  gather state, the lossy all-gather.
- ``--tp N``: a 2-D layout (:func:`tp_layout`): the GPT tensor-parallel over a lossy tp
  group, then DDP or FSDP2 over the dp group only. FSDP2's custom collectives need torch >= 2.10: the FSDP
  modules are imported only for ``fsdp`` (:func:`fsdp_api`), so ``ddp`` runs on older torch.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel.ddp import _pre_dp_module_transform
from torch.nn.parallel import DistributedDataParallel as DDP

from lossy_hooks.core.process_group import reliable
from lossy_hooks.core.state import LossyState
from lossy_hooks.group import lossy_subgroups
from lossy_hooks.hook import lossy_allreduce_hook
from lossy_hooks.study.workloads.gpt import tensor_parallel

__all__ = [
    "FSDP_MIN_TORCH",
    "STRATEGIES",
    "TPLayout",
    "fsdp_api",
    "full_state",
    "load_full_state",
    "load_local_state",
    "local_state",
    "no_grad_sync",
    "parallelize",
    "shard_units",
    "tp_layout",
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


@dataclass
class TPLayout:
    """The 2-D layout of ``--tp`` (W = dp x tp, rank = d*tp + t): this rank's lossy tp group
    (:func:`~lossy_hooks.lossy_subgroups` over ``[d*tp .. d*tp+tp-1]``), its plain dp group
    (``[t, tp+t, ...]``), its replica (``dp_rank`` = d) and the mesh's two dimensions."""

    tp: int
    dp: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    mesh: DeviceMesh
    dp_name: str
    tp_name: str

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh[self.tp_name]

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh[self.dp_name]


def tp_layout(tp: int, tp_state: LossyState, kinds: tuple[str, ...], device_type: str) -> TPLayout:
    """Every rank calls it, in the same order: the lossy tp groups (``tp_state`` serves this
    rank's), the dp groups (every rank calls ``new_group`` for every list), and the mesh. Its
    dimension names carry the tp group's unique name: a mesh over the same ranks with the
    same names (an earlier run in this process) would be taken for this one by DTensor."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = world // tp
    tp_group = lossy_subgroups(tp_state, [list(range(d * tp, d * tp + tp)) for d in range(dp)], kinds)
    dp_groups = [dist.new_group([d * tp + t for d in range(dp)]) for t in range(tp)]
    dp_group = dp_groups[rank % tp]
    names = (f"dp-{tp_group.group_name}", f"tp-{tp_group.group_name}")
    mesh = DeviceMesh.from_group(
        [dp_group, tp_group], device_type, mesh=torch.arange(world).view(dp, tp), mesh_dim_names=names
    )
    return TPLayout(tp, dp, rank // tp, tp_group, dp_group, mesh, *names)


def parallelize(
    model: nn.Module,
    strategy: str,
    state: LossyState,
    gather: LossyState | None,
    device: torch.device,
    bucket_cap_mb: float,
    layout: TPLayout | None = None,
) -> nn.Module:
    """The model to train, with the lossy collectives wired in. With a ``layout`` (``--tp``)
    the GPT is first made tensor-parallel over its tp mesh (under ``reliable()``: set-up
    traffic), then: ``ddp``, its DTensor parameters turned into local ones
    (``_pre_dp_module_transform``: DDP refuses DTensors, measured on torch 2.14) and DDP over
    the dp group (``state.process_group`` must be that group); ``fsdp``, ``fully_shard`` over
    the dp mesh (the 2-D recipe)."""
    if layout is not None:
        with reliable():
            tensor_parallel(model, layout.tp_mesh)  # type: ignore[arg-type]
    if strategy == "ddp":
        if layout is not None:
            _pre_dp_module_transform(model)
        with reliable() if layout is not None else contextlib.nullcontext():
            ddp = DDP(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                bucket_cap_mb=bucket_cap_mb,
                process_group=layout.dp_group if layout is not None else None,
            )
        ddp.register_comm_hook(state, lossy_allreduce_hook)
        return ddp
    if strategy != "fsdp":
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    fsdp = fsdp_api()
    mesh = {"mesh": layout.dp_mesh} if layout is not None else {}
    for unit in shard_units(model):
        fsdp.fully_shard(unit, **mesh)
    fsdp.fully_shard(model, **mesh)
    fsdp.register(model, state, all_gather=gather)
    return model


def local_state(named: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """This rank's own parameters (CPU copies) by name: a tensor-parallel model under DDP,
    whose parameters are this rank's shards (``named`` as taken right after
    :func:`parallelize`: after a forward its DTensor parameters are module attributes, out of
    ``state_dict()``)."""
    return {name: p.detach().cpu().clone() for name, p in named}


@torch.no_grad()
def load_local_state(named: list[tuple[str, nn.Parameter]], sd: dict[str, torch.Tensor]) -> None:
    """Copy what :func:`local_state` saved back into the parameters."""
    for name, p in named:
        p.copy_(sd[name])


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

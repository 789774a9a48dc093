"""How train_ddp.py parallelises a model (``--strategy ddp|fsdp``) and wires the lossy
communication into it; local gradient accumulation; whole-model checkpoints.

- ``ddp``: ``DistributedDataParallel`` with ``bucket_cap_mb``, the lossy allreduce hook.
- ``fsdp``: FSDP2 ``fully_shard`` on every transformer block of a GPT (every top-level child
  with parameters of another model), then on the model (the embeddings, final norm and
  head), and :func:`lossy_hooks.fsdp.register` for the lossy reduce-scatter and, with a
  gather state, the lossy all-gather.
- ``--tp N``: a 2-D layout (:func:`tp_layout`): the GPT tensor-parallel over a lossy tp
  group, then DDP or FSDP2 over the dp group only.
- ``--pp N``: (:func:`pp_layout`) this rank's stage of the GPT (``GPTStage``) under DDP over
  its stage's dp group; the schedule over the lossy pp group is
  :class:`lossy_hooks.study.pipelining.StagePipeline`'s.
- ``--ep N``: (:func:`ep_layout`) the MoE GPT's experts sharded over a lossy ep group, DDP
  over the world for the rest; the experts' gradients are reduced by
  :func:`reduce_expert_gradients`, not by DDP.

FSDP2's custom collectives need torch >= 2.10: the FSDP modules are imported only for
``fsdp`` (:func:`fsdp_api`), so ``ddp`` runs on older torch.
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
from lossy_hooks.study.workloads.moe import MoELayer

__all__ = [
    "FSDP_MIN_TORCH",
    "STRATEGIES",
    "EPLayout",
    "Layout",
    "PPLayout",
    "TPLayout",
    "ep_layout",
    "expert_parameters",
    "fsdp_api",
    "full_state",
    "load_full_state",
    "load_local_state",
    "local_state",
    "model_parallel_layout",
    "no_grad_sync",
    "parallelize",
    "pp_layout",
    "reduce_expert_gradients",
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


@dataclass
class PPLayout:
    """The layout of ``--pp`` (W = dp x pp, rank = d*pp + s): this rank's lossy pipeline group
    (:func:`~lossy_hooks.lossy_subgroups` over ``[d*pp .. d*pp+pp-1]``), its stage ``s`` and
    the plain dp group of that stage (``[s, pp+s, ...]``)."""

    pp: int
    dp: int
    dp_rank: int
    stage: int
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup


def pp_layout(pp: int, pp_state: LossyState, kinds: tuple[str, ...]) -> PPLayout:
    """Every rank calls it, in the same order: the lossy pipeline groups (``pp_state`` serves
    this rank's) and every stage's dp group."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = world // pp
    pp_group = lossy_subgroups(pp_state, [list(range(d * pp, d * pp + pp)) for d in range(dp)], kinds)
    dp_groups = [dist.new_group([d * pp + s for d in range(dp)]) for s in range(pp)]
    return PPLayout(pp, dp, rank // pp, rank % pp, pp_group, dp_groups[rank % pp])


@dataclass
class EPLayout:
    """The layout of ``--ep`` (within data parallelism: every rank is a replica of its own):
    ranks ``[g*ep .. g*ep+ep-1]`` one lossy ep group, whose rank ``i`` holds experts
    ``[i E/ep, (i+1) E/ep)``; the ranks ``i, ep+i, 2ep+i, ...`` hold the same experts, replicas
    whose gradients ``replica_group`` sums (``None`` when ``ep`` = W: no replicas)."""

    ep: int
    ep_group: dist.ProcessGroup
    replica_group: dist.ProcessGroup | None


def ep_layout(ep: int, ep_state: LossyState, kinds: tuple[str, ...]) -> EPLayout:
    """Every rank calls it, in the same order: the lossy ep groups and the expert replicas'
    plain groups."""
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = world // ep
    ep_group = lossy_subgroups(ep_state, [list(range(g * ep, g * ep + ep)) for g in range(groups)], kinds)
    replica_group = None
    if groups > 1:
        replicas = [dist.new_group([g * ep + i for g in range(groups)]) for i in range(ep)]
        replica_group = replicas[rank % ep]
    return EPLayout(ep, ep_group, replica_group)


Layout = TPLayout | PPLayout | EPLayout


def model_parallel_layout(
    sizes: dict[str, int], states: dict[str, LossyState], kinds: dict[str, tuple[str, ...]], device_type: str
) -> Layout | None:
    """The layout of the run's model parallelism (``sizes``: ``tp``, ``pp``, ``ep``; at most
    one > 1), its group lossy with ``states[type]`` on collectives ``kinds[type]``; ``None``
    for data parallelism alone."""
    if sizes["tp"] > 1:
        return tp_layout(sizes["tp"], states["tp"], kinds["tp"], device_type)
    if sizes["pp"] > 1:
        return pp_layout(sizes["pp"], states["pp"], kinds["pp"])
    if sizes["ep"] > 1:
        return ep_layout(sizes["ep"], states["ep"], kinds["ep"])
    return None


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The MoE layers' expert parameters of ``model`` by name (``MoELayer.EXPERT_PARAMETERS``):
    under ``--ep`` each rank's own experts."""
    return [
        (f"{name}.{p}", getattr(module, p))
        for name, module in model.named_modules()
        if isinstance(module, MoELayer)
        for p in MoELayer.EXPERT_PARAMETERS
    ]


@torch.no_grad()
def reduce_expert_gradients(
    params: list[nn.Parameter], replica_group: dist.ProcessGroup | None, scale: float
) -> None:
    r"""The data-parallel reduction of the experts' gradients under ``--ep`` (after the
    backward of an optimizer step's last micro-batch). Rank :math:`r`'s loss :math:`L_r`
    reaches expert :math:`e` through the all-to-alls, so the autograd gradient at the expert's
    rank is already :math:`\sum_{r \in G} \partial L_r / \partial 	heta_e` over its ep group
    :math:`G`; summed over the replica groups (``replica_group``: the other ep groups' ranks
    holding the same experts) and times ``scale`` (``1/W`` for ``--use_avg``, else 1) it is
    the gradient DDP gives the replicated parameters, :math:`rac1W \sum_r \partial L_r /
    \partial 	heta`. The replicas' sum is one plain (lossless) all-reduce: data-parallel loss
    reaches the replicated parameters only."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if replica_group is not None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=replica_group)
        for g, summed in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(summed.view_as(g))
    torch._foreach_mul_(grads, scale)


def parallelize(
    model: nn.Module,
    strategy: str,
    state: LossyState,
    gather: LossyState | None,
    device: torch.device,
    bucket_cap_mb: float,
    layout: Layout | None = None,
) -> nn.Module:
    """The model to train, with the lossy collectives wired in. With a :class:`TPLayout`
    (``--tp``) the GPT is first made tensor-parallel over its tp mesh (under ``reliable()``:
    set-up traffic), then: ``ddp``, its DTensor parameters turned into local ones
    (``_pre_dp_module_transform``: DDP refuses DTensors, measured on torch 2.14) and DDP over
    the dp group (``state.process_group`` must be that group); ``fsdp``, ``fully_shard`` over
    the dp mesh (the 2-D recipe). With a :class:`PPLayout` ``model`` is this rank's stage,
    DDP'd over its stage's dp group; with an :class:`EPLayout`, DDP leaves the experts out
    (:func:`reduce_expert_gradients` reduces them)."""
    if isinstance(layout, TPLayout):
        with reliable():
            tensor_parallel(model, layout.tp_mesh)  # type: ignore[arg-type]
    if strategy == "ddp":
        if isinstance(layout, TPLayout):
            _pre_dp_module_transform(model)
        if isinstance(layout, EPLayout):
            names = [name for name, _ in expert_parameters(model)]
            DDP._set_params_and_buffers_to_ignore_for_model(model, names)
        dp_group = layout.dp_group if isinstance(layout, (TPLayout, PPLayout)) else None
        with reliable() if layout is not None else contextlib.nullcontext():
            ddp = DDP(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                bucket_cap_mb=bucket_cap_mb,
                process_group=dp_group,
            )
        ddp.register_comm_hook(state, lossy_allreduce_hook)
        return ddp
    if strategy != "fsdp":
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if layout is not None and not isinstance(layout, TPLayout):
        raise ValueError("--pp and --ep run under --strategy ddp")
    fsdp = fsdp_api()
    mesh = {"mesh": layout.dp_mesh} if layout is not None else {}
    for unit in shard_units(model):
        fsdp.fully_shard(unit, **mesh)
    fsdp.fully_shard(model, **mesh)
    fsdp.register(model, state, all_gather=gather)
    return model


def local_state(named: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """This rank's own parameters (CPU copies) by name: a model-parallel model under DDP, whose
    parameters are this rank's shards, stage or experts (``named`` as taken right after
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

"""How train_ddp.py parallelises a model (``--strategy ddp|fsdp``) and wires the lossy
communication into it; local gradient accumulation; whole-model checkpoints.

- ``ddp``: ``DistributedDataParallel`` with ``bucket_cap_mb``, the lossy allreduce hook.
- ``fsdp``: FSDP2 ``fully_shard`` on every transformer block of a GPT (every top-level child
  with parameters of another model), then on the model (the embeddings, final norm and
  head), and :func:`lossy_hooks.fsdp.register` for the lossy reduce-scatter and, with a
  gather state, the lossy all-gather.
- ``--tp N``, ``--pp N``, ``--ep N``, composable: one layout (:class:`MeshLayout`, the
  ranks of :class:`~lossy_hooks.study.mesh.MeshShape`, ``W = dp x pp x tp``, ``ep`` within
  dp): with ``--pp`` the model is this rank's stage (``GPTStage``; the schedule over the
  lossy pp group is :class:`lossy_hooks.study.pipelining.StagePipeline`'s); with ``--tp`` it
  (the GPT or the stage) is made tensor-parallel over the lossy tp group; then DDP or FSDP2
  over the dp group only. With ``--ep`` the MoE GPT's experts are sharded over a lossy ep
  group; DDP leaves them out and :func:`reduce_expert_gradients` reduces them.

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
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel.ddp import _pre_dp_module_transform
from torch.nn.parallel import DistributedDataParallel as DDP

from lossy_hooks.core.process_group import reliable
from lossy_hooks.core.state import LossyState
from lossy_hooks.group import lossy_subgroups
from lossy_hooks.hook import lossy_allreduce_hook
from lossy_hooks.study.mesh import MeshShape
from lossy_hooks.study.workloads.gpt import tensor_parallel
from lossy_hooks.study.workloads.moe import MoELayer

__all__ = [
    "FSDP_MIN_TORCH",
    "STRATEGIES",
    "MeshLayout",
    "expert_parameters",
    "fsdp_api",
    "full_state",
    "load_full_state",
    "load_local_state",
    "local_state",
    "model_parallel_layout",
    "no_grad_sync",
    "parallelize",
    "reduce_expert_gradients",
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


@dataclass
class MeshLayout:
    """The groups of a run's composed parallelisms (:class:`~lossy_hooks.study.mesh.MeshShape`:
    ``W = dp x pp x tp``, ``ep`` within dp), as this rank sees them: its lossy ``tp``, ``pp``
    and ``ep`` groups (:func:`~lossy_hooks.lossy_subgroups`; ``None`` for a size of 1), its
    plain dp group (``None`` when ``dp`` = W: the world) and expert-replica group (``None``
    without replicas), and the one ``DeviceMesh`` over ``dp x pp x tp`` (its dimensions of
    size > 1 and dp; their names carry a lossy group's unique name: a mesh over the same ranks
    with the same names, an earlier run in this process, would be taken for this one by
    DTensor). Expert parallelism is not a mesh dimension: its groups split dp's."""

    shape: MeshShape
    rank: int
    tp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    ep_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    replica_group: dist.ProcessGroup | None
    mesh: DeviceMesh
    dim_names: dict[str, str]

    @property
    def dp_rank(self) -> int:
        return self.shape.coords(self.rank)[0]

    @property
    def stage(self) -> int:
        return self.shape.coords(self.rank)[1]

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh[self.dim_names["tp"]]

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh[self.dim_names["dp"]]


def model_parallel_layout(
    shape: MeshShape, states: dict[str, LossyState], kinds: dict[str, tuple[str, ...]], device_type: str
) -> MeshLayout | None:
    """Every rank calls it, in the same order: the lossy groups of each model-parallel type of
    size > 1 (``tp``, ``pp``, ``ep``; ``states[type]`` serves this rank's, losing collectives
    ``kinds[type]``), the plain dp and expert-replica groups (every rank calls ``new_group``
    for every list), and the mesh. ``None`` for data parallelism alone."""
    sizes = {"tp": shape.tp, "pp": shape.pp, "ep": shape.ep}
    if all(size == 1 for size in sizes.values()):
        return None
    rank = dist.get_rank()
    lossy = {
        kind: lossy_subgroups(states[kind], shape.groups(kind), kinds[kind]) if size > 1 else None
        for kind, size in sizes.items()
    }

    def plain(kind: str) -> dist.ProcessGroup:
        groups = [dist.new_group(ranks) for ranks in shape.groups(kind)]
        return groups[shape.group_index(kind, rank)]

    dp_group = plain("dp") if shape.dp < shape.world else None
    replica_group = plain("expert_replica") if 1 < shape.ep < shape.dp else None
    unique = next(g for g in lossy.values() if g is not None).group_name
    dims = [(k, n) for k, n in (("dp", shape.dp), ("pp", shape.pp), ("tp", shape.tp)) if k == "dp" or n > 1]
    dim_names = {kind: f"{kind}-{unique}" for kind, _ in dims}
    groups = {"dp": dp_group or dist.group.WORLD, "pp": lossy["pp"], "tp": lossy["tp"]}
    mesh = DeviceMesh.from_group(
        [groups[kind] for kind, _ in dims],
        device_type,
        mesh=torch.arange(shape.world).view(*[size for _, size in dims]),
        mesh_dim_names=tuple(dim_names.values()),
    )
    return MeshLayout(
        shape, rank, lossy["tp"], lossy["pp"], lossy["ep"], dp_group, replica_group, mesh, dim_names
    )


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
    rank is already :math:`\sum_{r \in G} \partial L_r / \partial \theta_e` over its ep group
    :math:`G`; summed over the replica groups (``replica_group``: the other ep groups' ranks
    holding the same experts) and times ``scale`` (``1/dp`` for ``--use_avg``, else 1) it is
    the gradient DDP gives the replicated parameters over the ``dp`` replicas,
    :math:`\frac1{dp} \sum_d \partial L_d / \partial \theta` (with ``--tp`` each tp rank
    exchanges its own replica's tokens: the sums run over replicas, not ranks). The replicas'
    sum is one plain (lossless) all-reduce: data-parallel loss reaches the replicated
    parameters only."""
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
    layout: MeshLayout | None = None,
    sequence_parallel: bool = False,
) -> nn.Module:
    """The model to train (a GPT, or with ``--pp`` this rank's ``GPTStage``), with the lossy
    collectives wired in. With a tp group the model is first made tensor-parallel over the
    layout's tp mesh (under ``reliable()``: set-up traffic; ``sequence_parallel``: its
    residual stream split along the sequence, ``--sequence_parallel``), then: ``ddp``, its DTensor
    parameters turned into local ones (``_pre_dp_module_transform``: DDP refuses DTensors,
    measured on torch 2.14) and DDP over the dp group (``state.process_group`` must be that
    group; ``None``, the world, without tp and pp), leaving an ep model's experts out
    (:func:`reduce_expert_gradients` reduces them); ``fsdp``, ``fully_shard`` over the dp
    mesh (with tp the 2-D recipe; with pp the stage's blocks and the stage, which
    ``PipelineStage`` drives as an FSDP module), an ep model's experts left out
    (``ignored_params``: sharded over the ep group already, reduced by
    :func:`reduce_expert_gradients`)."""
    tensor_parallel_model = layout is not None and layout.tp_group is not None
    if tensor_parallel_model:
        with reliable():
            tensor_parallel(model, layout.tp_mesh, sequence_parallel)  # type: ignore[arg-type, union-attr]
    if strategy == "ddp":
        if tensor_parallel_model:
            _pre_dp_module_transform(model)
        if layout is not None and layout.ep_group is not None:
            names = [name for name, _ in expert_parameters(model)]
            DDP._set_params_and_buffers_to_ignore_for_model(model, names)
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
    options: dict[str, Any] = {"mesh": layout.dp_mesh} if layout is not None else {}
    if layout is not None and layout.ep_group is not None:
        options["ignored_params"] = {p for _, p in expert_parameters(model)}
    for unit in shard_units(model):
        fsdp.fully_shard(unit, **options)
    fsdp.fully_shard(model, **options)
    fsdp.register(model, state, all_gather=gather)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local part (an FSDP shard), any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_state(
    named: list[tuple[str, nn.Parameter]], opt: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's own parameters by name and its optimizer state, CPU copies of their local
    parts: a model-parallel model, whose parameters are this rank's shards, stage or experts
    (under FSDP, with pp or ep, DTensors sharded over the dp group: their local shards; the
    optimizer state's ``"dtensor"`` lists which entries were DTensors). ``named`` as taken
    right after :func:`parallelize` (after a forward a tp model's DTensor parameters are
    module attributes under DDP, and FSDP's may be unsharded)."""
    model_sd = {name: _local(p.detach()).cpu().clone() for name, p in named}
    opt_sd = opt.state_dict()
    state: dict[Any, dict[str, Any]] = {}
    dtensor = []  # [key, entry] of the DTensor entries, rebuilt by load_local_state
    for key, per_param in opt_sd["state"].items():
        state[key] = {k: _local(v).cpu().clone() if torch.is_tensor(v) else v for k, v in per_param.items()}
        dtensor += [[key, k] for k, v in per_param.items() if isinstance(v, DTensor)]
    return model_sd, {"state": state, "param_groups": opt_sd["param_groups"], "dtensor": dtensor}


@torch.no_grad()
def load_local_state(
    named: list[tuple[str, nn.Parameter]],
    opt: torch.optim.Optimizer,
    model_sd: dict[str, torch.Tensor],
    opt_sd: dict[str, Any],
) -> None:
    """Copy what :func:`local_state` saved back into the parameters (their local parts; an
    FSDP module must be sharded, as after the round's warm-up) and the optimizer (the entries
    that were DTensors become DTensors of their parameter's mesh and placements again)."""
    for name, p in named:
        _local(p).copy_(model_sd[name])
    params = [p for group in opt.param_groups for p in group["params"]]
    state = {key: dict(per_param) for key, per_param in opt_sd["state"].items()}
    for key, k in opt_sd.get("dtensor", []):
        p, placed = params[int(key)], state[key][k].to(_local(p).device)
        spec = {"shape": p.shape, "stride": p.stride()}
        state[key][k] = DTensor.from_local(placed, p.device_mesh, p.placements, **spec)
    opt.load_state_dict({"state": state, "param_groups": opt_sd["param_groups"]})


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

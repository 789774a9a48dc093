"""A round's checkpoint: what is saved at the end of each epoch and restored by ``--resume``.

One file per round, written atomically by rank 0: the model and optimizer (gathered whole
under FSDP), the AMP scaler, and every rank's own part (``ranks[r]``): its hook state (loss
streams, ledger, clock), its all-gather state, its traffic states (``--tp``'s, ...), its
RNG states, and, where the replicas differ (``--post_sync independent``) or the rank holds
parameters of its own (``--tp`` under DDP, ``--pp``, ``--ep``; under FSDP2 the local shards),
its own model and optimizer. Restoring it gives the same results as a run that was never
stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lossy_hooks.core.process_group import reliable
from lossy_hooks.study.parallel import full_state, load_full_state, load_local_state, local_state
from lossy_hooks.study.run_io import atomic_save, to_cpu

if TYPE_CHECKING:
    from lossy_hooks.study.rounds import RoundRunner


def save_checkpoint(runner: RoundRunner, path: Path, epoch: int) -> None:
    """Every rank's part gathered to rank 0, which writes ``path`` (a collective). Reliable:
    the gathers of a tensor-parallel model's shards cross its lossy tp group, and must neither
    lose nor count there."""
    with reliable():
        _save(runner, path, epoch)


def _save(runner: RoundRunner, path: Path, epoch: int) -> None:
    independent = runner.cfg["post_sync"] == "independent" and runner.cfg["drop_point"] != "worker"
    mine = {
        "hook": runner.state.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if runner.device.type == "cuda" else None,
    }
    if runner.gather is not None:
        mine["gather"] = runner.gather.state_dict()
    if runner.traffic:  # the traffic states (tp, ...): their streams continue on resume
        mine["traffic"] = {kind: state.state_dict() for kind, state in runner.traffic.items()}
    if runner.local_params:  # model-parallel: each rank its own shards, stage or experts
        if runner.fsdp:  # sharded again, as state_dict()'s FSDP hook does (the whole-model
            runner.module.reshard()  # save): the next forward gathers, as after a resume
        model_sd, opt_sd = local_state(runner.local_params, runner.opt)
        mine["model"], mine["optimizer"] = model_sd, opt_sd
    elif runner.fsdp:  # the whole model and optimizer, gathered on rank 0 (a collective)
        model_sd, opt_sd = full_state(runner.module, runner.opt)
    else:
        model_sd, opt_sd = runner.module.state_dict(), runner.opt.state_dict()
    if independent and not runner.fsdp and not runner.local_params:
        # replicas differ: keep each one (CPU copies: NCCL cannot gather objects on GPU)
        mine["model"] = to_cpu(runner.module.state_dict())
        mine["optimizer"] = to_cpu(runner.opt.state_dict())
    ranks: list[Any] = [None] * runner.world
    dist.all_gather_object(ranks, mine)
    if runner.rank == 0:
        ckpt = {
            "epoch": epoch,
            "steps": runner.steps,
            "model": model_sd,
            "optimizer": opt_sd,
            "scaler": runner.scaler.state_dict(),
            "ranks": ranks,
        }
        atomic_save(ckpt, path)


def load_checkpoint(runner: RoundRunner, path: Path) -> tuple[int, int]:
    """Restore ``runner``'s model, optimizer, scaler, hook, all-gather, traffic and RNG states
    from ``path``; return the epochs and steps it had finished (reliable, as the save)."""
    with reliable():
        return _load(runner, path)


def _load(runner: RoundRunner, path: Path) -> tuple[int, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    mine = ckpt["ranks"][runner.rank]
    if runner.local_params:
        if runner.fsdp:  # the sharded parameters are the ones registered (as at the save)
            runner.module.reshard()
        load_local_state(runner.local_params, runner.opt, mine["model"], mine["optimizer"])
    elif runner.fsdp:
        load_full_state(runner.module, runner.opt, ckpt["model"], ckpt["optimizer"])
    else:
        runner.module.load_state_dict(mine.get("model", ckpt["model"]))
        runner.opt.load_state_dict(mine.get("optimizer", ckpt["optimizer"]))
    if runner.gather is not None:
        runner.gather.load_state_dict(mine["gather"])
    runner.scaler.load_state_dict(ckpt["scaler"])
    runner.state.load_state_dict(mine["hook"])
    for kind, state in runner.traffic.items():
        state.load_state_dict(mine["traffic"][kind])
    torch.set_rng_state(mine["torch_rng"].cpu())
    if runner.device.type == "cuda" and mine.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(mine["cuda_rng"].cpu())
    return int(ckpt["epoch"]), int(ckpt["steps"])

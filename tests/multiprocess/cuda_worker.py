"""One rank of a CUDA process group for tests/multiprocess/test_cuda.py: ``cuda_worker.py OUT.json BACKEND
SCENARIO [...]``. With one GPU: NCCL at world size 1, Gloo on CUDA tensors at world size 2
(both ranks on device 0)."""

from __future__ import annotations

import io
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lossy_hooks import GilbertElliott, LossyState, lossy_allreduce_hook
from lossy_hooks.core.pipeline.sharded import ShardedCollectives

try:  # run as a script (tests/ on sys.path) or imported from the tests package
    from launch import run_scenarios
except ImportError:
    from tests.launch import run_scenarios


def device() -> torch.device:
    return torch.device("cuda", 0)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def train(state: LossyState | None, steps: int = 6, dtype: torch.dtype = torch.float32, amp: bool = False):
    model = small_model().to(device(), dtype=dtype)
    ddp = DDP(model, device_ids=[0] if dist.get_backend() == "nccl" else None, bucket_cap_mb=0.05)
    if state is not None:
        state.name_parameters(model)
        ddp.register_comm_hook(state, lossy_allreduce_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator(device=device()).manual_seed(10 + dist.get_rank())
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        x = torch.randn(16, 64, generator=gen, device=device()).to(dtype)
        y = torch.randint(0, 10, (16,), generator=gen, device=device())
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = nn.functional.cross_entropy(ddp(x).float(), y)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return [p.detach().clone() for p in model.parameters()]


def stats_before_and_after_resume() -> dict:
    """stats/loss_by_parameter(all_ranks=True) before any bucket and after load_state_dict
    (device unknown: taken from the backend), and a state_dict loaded with
    map_location='cuda' (generator states moved to the GPU) resuming the same losses."""
    kw = dict(loss_model=GilbertElliott(0.05, 0.3), mtu=256, drop_point="both", fill="zero", seed=1)
    state = LossyState(**kw)
    before = state.stats(all_ranks=True)
    state.loss_by_parameter({}, all_ranks=True)
    train(state, steps=3)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    expected = train(state, steps=3)
    again = LossyState(**kw)
    buf.seek(0)
    again.load_state_dict(torch.load(buf, map_location="cuda", weights_only=True))
    after_load = again.stats(all_ranks=True)
    resumed = train(again, steps=3)
    return {
        "before_steps": before["steps"],
        "after_load_lost": after_load["worker"]["packets_lost"],
        "same_losses": again.stats()["worker"]["packets_lost"] == state.stats()["worker"]["packets_lost"],
        "params_finite": all(bool(p.isfinite().all()) for p in resumed + expected),
    }


def dtypes_and_bitwise() -> dict:
    """Loss 0 is bitwise plain DDP on CUDA buckets; lossy fp16/bf16/AMP buckets stay finite."""
    out = {}
    ref = train(None)
    for name, kw in {
        "worker": dict(drop_point="worker", fill="rescale"),
        "post_stale": dict(drop_point="post", fill="stale"),
        "append": dict(drop_point="worker", fill="rescale", counts_transport="append"),
    }.items():
        got = train(LossyState(loss_rate=0.0, mtu=512, **kw))
        out[f"bitwise_{name}"] = all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for fill in ("rescale", "zero"):
            params = train(LossyState(loss_rate=0.1, mtu=512, drop_point="both", fill=fill), dtype=dtype)
            out[f"finite_{dtype}_{fill}"] = all(bool(p.isfinite().all()) for p in params)
    params = train(LossyState(loss_rate=0.1, mtu=512, drop_point="post", fill="stale"), amp=True)
    out["finite_amp_stale"] = all(bool(p.isfinite().all()) for p in params)
    return out


def no_device_sync() -> dict:
    """The hook enqueues without waiting for the device: backward under sync debug mode
    "error" raises on any synchronising call."""
    out: dict[str, str] = {}
    if dist.get_backend() != "nccl":  # Gloo on CUDA tensors copies through the host by design
        return out
    for name, kw in {
        "worker_rescale_separate": dict(drop_point="worker", fill="rescale", counts_transport="separate"),
        "ge_both_zero": dict(loss_model=GilbertElliott(0.05, 0.3), drop_point="both", fill="zero"),
        "post_stale": dict(loss_rate=0.1, drop_point="post", fill="stale"),
        "independent_rescale": dict(loss_rate=0.1, drop_point="post", post_sync="independent"),
        "hadamard_rescale": dict(loss_rate=0.1, fill="rescale", encoding="hadamard", hadamard_block=1024),
        "error_feedback": dict(loss_rate=0.1, fill="zero", error_feedback=True),
        "fec_retransmit_protect": dict(loss_rate=0.1, fec=(4, 1), retransmit=1, protect="bias"),
        "wire_bf16": dict(loss_rate=0.1, wire_dtype="bf16"),
    }.items():
        if "loss_model" not in kw and "loss_rate" not in kw:
            kw = dict(kw, loss_rate=0.1)
        state = LossyState(mtu=512, **kw)
        train(state, steps=2)  # first iteration and DDP's rebuild outside the check
        model = small_model().to(device())
        state.name_parameters(model)  # for protect=
        ddp = DDP(model, device_ids=[0] if dist.get_backend() == "nccl" else None, bucket_cap_mb=0.05)
        ddp.register_comm_hook(state, lossy_allreduce_hook)
        x = torch.randn(16, 64, device=device())
        for _ in range(2):  # DDP's first iteration and its bucket rebuild (which syncs) first
            ddp(x).sum().backward()
        torch.cuda.synchronize()
        try:
            for _ in range(3):
                y = ddp(x).sum()  # forward outside the check: only backward runs the hook
                torch.cuda.set_sync_debug_mode("error")
                y.backward()
                torch.cuda.set_sync_debug_mode("default")
            error = ""
        except RuntimeError as e:
            error = str(e)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        out[name] = error
    return out


def fsdp_no_device_sync() -> dict:
    """The FSDP2 collectives on CUDA tensors (NCCL): each configuration called once (records
    made), then three times under sync debug mode "error"; the shard must stay finite. At
    world size 1 a rank sends no row over the network, so this covers the post drop's masks
    and the code paths of the others."""
    from lossy_hooks import fsdp

    out: dict[str, str] = {}
    if dist.get_backend() != "nccl":  # Gloo on CUDA tensors copies through the host by design
        return out
    world, rank = dist.get_world_size(), dist.get_rank()
    for name, kw in {
        "worker_rescale_separate": dict(counts_transport="separate"),
        "worker_zero": dict(fill="zero"),
        "post_rescale_shared": dict(drop_point="post"),
        "post_stale_independent": dict(drop_point="post", fill="stale", post_sync="independent"),
        "both_gemodel": dict(drop_point="both", loss_model=GilbertElliott(0.05, 0.3)),
        "gather_stale": None,
    }.items():
        rows = torch.full((world * 4096,), float(2**rank), device=device())
        shard = torch.empty(4096, device=device())
        comm: Any
        if kw is None:
            comm = fsdp.LossyAllGather(
                ShardedCollectives(fsdp.gather_state(loss_rate=0.2, mtu=512), 0), 0, "x"
            )
            args: tuple = (rows, shard.fill_(1.0), dist.group.WORLD)
        else:
            kw = kw if "loss_model" in kw else dict(kw, loss_rate=0.2)
            comm = fsdp.LossyReduceScatter(ShardedCollectives(LossyState(mtu=512, **kw), 1), 0, "x")
            args = (shard, rows, dist.group.WORLD, dist.ReduceOp.AVG)  # rows rescaled in place: finite
        comm(*args)
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            for _ in range(3):
                comm(*args)
            error = ""
        except RuntimeError as e:
            error = str(e)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        finite = bool(torch.isfinite(rows).all() and torch.isfinite(shard).all())
        out[name] = error or ("" if finite else "non-finite values")
    return out


SCENARIOS = {
    f.__name__: f
    for f in (stats_before_and_after_resume, dtypes_and_bitwise, no_device_sync, fsdp_no_device_sync)
}


def main() -> None:
    out_path, backend, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.cuda.set_device(0)
    dist.init_process_group(backend, device_id=device() if backend == "nccl" else None)
    run_scenarios(SCENARIOS, names, out_path)


if __name__ == "__main__":
    main()

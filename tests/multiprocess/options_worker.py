"""One rank of a Gloo launch (see launch.py) exercising the encodings and protections of the
hook inside real DDP: Hadamard, error feedback, wire dtypes (own option and PyTorch's
compress wrappers), protected parameters, FEC and retransmission.
Usage: options_worker.py OUT.json SCENARIO [...]"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import (
    bf16_compress_wrapper,
    fp16_compress_wrapper,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from lossy_hooks import GilbertElliott, LossyState, lossy_allreduce_hook

try:  # run as a script (tests/ on sys.path) or imported from the tests package
    from hook_worker import Probe
    from launch import worker_main
except ImportError:
    from tests.launch import worker_main
    from tests.multiprocess.hook_worker import Probe


class VectorProbe(Probe):
    """Like Probe, but the gradient of parameter i is a given vector x_i (loss = sum w * x)."""

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return sum((w * x).sum() for w, x in zip(self.ws, xs, strict=True))  # type: ignore[return-value]


def grads_for(step: int, sizes: list[int], rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(n, generator=g) for n in sizes]


def run_steps(state: LossyState | None, sizes: list[int], steps: int, fixed: bool = False) -> torch.Tensor:
    """Results (steps, sum(sizes)) of DDP with ``state``'s hook (no hook when None)."""
    model = VectorProbe(sizes)
    ddp = DDP(model, bucket_cap_mb=25)
    if state is not None:
        state.name_parameters(model)
        state._last_model = model  # type: ignore[attr-defined]
        ddp.register_comm_hook(state, lossy_allreduce_hook)
    out = []
    for t in range(steps):
        ddp.zero_grad(set_to_none=True)
        ddp(grads_for(0 if fixed else t, sizes, dist.get_rank())).backward()
        out.append(torch.cat([w.grad.detach().clone() for w in model.ws]))
    return torch.stack(out)


def true_mean(sizes: list[int], steps: int, fixed: bool = False) -> torch.Tensor:
    w = dist.get_world_size()
    rows = [
        torch.stack([torch.cat(grads_for(0 if fixed else t, sizes, r)) for r in range(w)])
        for t in range(steps)
    ]
    return torch.stack(rows).mean(1)


def hadamard() -> dict:
    """Loss 0: the lossless mean to round-off; rescale: unbiased; Gilbert-Elliott bursts
    (mean burst 4 packets) with zero fill: worst-coordinate error with and without."""
    sizes, steps = [12000, 4384], 150  # one block of 16384
    lossless = run_steps(LossyState(encoding="hadamard", hadamard_block=16384, seed=1), sizes, 3)
    ref = true_mean(sizes, 3)
    rel = float(((lossless - ref).norm(dim=1) / ref.norm(dim=1)).max())
    fixed_ref = true_mean(sizes, 1, fixed=True)[0]
    unbiased = {}
    for encoding in ("none", "hadamard"):
        st = LossyState(
            loss_rate=0.3, mtu=400, fill="rescale", encoding=encoding, hadamard_block=1024, seed=2
        )
        res = run_steps(st, sizes, steps, fixed=True)
        unbiased[encoding] = {
            "mean_rel_err": float((res.mean(0) - fixed_ref).norm() / fixed_ref.norm()),
            "one_step_rel_err": float((res[0] - fixed_ref).norm() / fixed_ref.norm()),
        }
    burst = {}
    for encoding in ("none", "hadamard"):
        st = LossyState(
            loss_model="gemodel 2% 25%", mtu=400, fill="zero", encoding=encoding, hadamard_block=16384, seed=3
        )
        res = run_steps(st, sizes, 60)
        burst[encoding] = {
            "worst_coordinate": float((res - true_mean(sizes, 60)).abs().max(1).values.mean()),
            "lost": st.stats()["worker"]["packets_lost"],
            "packets": st.stats()["buckets"][-1]["packets"],
        }
    return {"lossless_rel_l2": rel, "unbiased": unbiased, "burst": burst}


def hadamard_default() -> dict:
    """The default block against bursts: one bucket of 4,000 packets of 1500 B (1.5M fp32),
    Gilbert-Elliott loss with a stationary 5% and mean bursts of 4 packets, post drop, zero
    fill, 5 steps: the mean over steps of the worst coordinate's error against the lossless
    mean, plain, at the default block and at the old default (4096). And loss 0 in other
    bucket dtypes (fp16, bf16, fp64, an fp32 model under fp16_compress_wrapper): the mean
    to the dtype's round-off."""
    sizes, steps, r = [1_500_000], 5, 0.25
    ref = true_mean(sizes, steps)
    worst = {}
    for label, kw in {
        "none": {},
        "default": {"encoding": "hadamard"},
        "4096": {"encoding": "hadamard", "hadamard_block": 4096},
    }.items():
        bursts = GilbertElliott(r * 0.05 / 0.95, r)
        st = LossyState(loss_model=bursts, mtu=1500, drop_point="post", fill="zero", seed=3, **kw)
        res = run_steps(st, sizes, steps)
        worst[label] = {
            "worst_coordinate": float((res - ref).abs().max(1).values.mean()),
            "loss": st.stats()["post"]["packets_lost"] / st.stats()["post"]["packets_sent"],
            "block": st.hadamard_block,
        }
    small = [3000, 1234]
    lossless = {}
    for label, dtype, wrapper in (
        ("fp16", torch.float16, None),
        ("bf16", torch.bfloat16, None),
        ("fp64", torch.float64, None),
        ("fp16_wrapper", torch.float32, fp16_compress_wrapper),
    ):
        model = VectorProbe(small).to(dtype)
        ddp = DDP(model, bucket_cap_mb=25)
        st = LossyState(encoding="hadamard", seed=4)
        ddp.register_comm_hook(st, lossy_allreduce_hook if wrapper is None else wrapper(lossy_allreduce_hook))
        errs = []
        for t in range(2):
            ddp.zero_grad(set_to_none=True)
            ddp([g.to(dtype) for g in grads_for(t, small, dist.get_rank())]).backward()
            got = torch.cat([w.grad.double() for w in model.ws])
            exact = torch.stack(
                [torch.cat(grads_for(t, small, q)).to(dtype).double() for q in range(dist.get_world_size())]
            ).mean(0)
            errs.append(float((got - exact).norm() / exact.norm()))
        eps = torch.finfo(torch.float16 if wrapper is not None else dtype).eps
        lossless[label] = {"rel_l2": max(errs), "eps": eps, "grad_dtype": str(model.ws[0].grad.dtype)}
    return {"worst": worst, "lossless": lossless}


def error_feedback() -> dict:
    """Sum reduction, zero fill, 30% loss: what arrived over T steps plus every rank's
    residual equals the sum of all gradients (to round-off)."""
    sizes, steps = [1000, 777], 25
    st = LossyState(loss_rate=0.3, mtu=400, fill="zero", reduction="sum", error_feedback=True, seed=4)
    arrived = run_steps(st, sizes, steps).sum(0)
    # per parameter, over every bucket record (DDP regroups after its first iteration)
    per_param: dict[int, torch.Tensor] = {}
    for record in st.buckets.records.values():
        entry = st.ledger.buckets[record.key]
        start = 0
        for pid, size in zip(entry.param_ids, entry.sizes, strict=True):
            if record.residual is not None:
                part = record.residual[start : start + size]
                per_param[pid] = per_param.get(pid, torch.zeros(size)) + part
            start += size
    order = [id(w) for w in st._last_model.ws]
    residual = torch.cat([per_param[pid] for pid in order])
    residuals = [torch.zeros_like(residual) for _ in range(dist.get_world_size())]
    dist.all_gather(residuals, residual)
    total = true_mean(sizes, steps).sum(0) * dist.get_world_size()
    recovered = arrived + sum(residuals)
    return {
        "ef_rel_err": float((recovered - total).norm() / total.norm()),
        "without_rel_err": float((arrived - total).norm() / total.norm()),
        "residual_records": sum(r.residual is not None for r in st.buckets.records.values()),
        "residual_in_state": len(st.state_dict()["residual"]),
    }


def wire_dtypes() -> dict:
    """Packets on the wire dtype, three ways: wire_dtype=, and PyTorch's compress wrappers
    around the lossy hook. mtu 1500: 750 fp16/bf16 elements a packet."""
    sizes = [2000, 1000]
    out = {}
    for label, kwargs, wrapper in (
        ("fp32", {}, None),
        ("fp16", {"wire_dtype": "fp16"}, None),
        ("bf16", {"wire_dtype": "bf16"}, None),
        ("fp16_wrapper", {}, fp16_compress_wrapper),
        ("bf16_wrapper", {}, bf16_compress_wrapper),
    ):
        st = LossyState(loss_rate=0.0, mtu=1500, **kwargs)
        model = VectorProbe(sizes)
        ddp = DDP(model, bucket_cap_mb=25)
        ddp.register_comm_hook(st, lossy_allreduce_hook if wrapper is None else wrapper(lossy_allreduce_hook))
        ddp(grads_for(0, sizes, dist.get_rank())).backward()
        got = torch.cat([w.grad for w in model.ws])
        ref = true_mean(sizes, 1)[0]
        s = st.stats()
        out[label] = {
            "packets": s["buckets"][0]["packets"],
            "bytes_sent": s["worker"]["bytes_sent"],
            "max_rel_err": float((got - ref).abs().max() / ref.abs().max()),
        }
    return out


def protect_and_recover() -> dict:
    """protect='bias' at 50% loss: the bias gradients are always exact; FEC + retransmission
    with worker rescale: regenerate (peers replayed through FEC) gives what separate gives."""
    sizes = [1200, 30]
    st = LossyState(loss_rate=0.5, mtu=400, fill="zero", protect=r"ws\.1$", seed=5)
    res = run_steps(st, sizes, 20)
    ref = true_mean(sizes, 20)
    protect = {
        "bias_max_err": float((res[:, 1200:] - ref[:, 1200:]).abs().max()),
        "weight_lost_steps": int(((res[:, :1200] - ref[:, :1200]).abs().max(1).values > 1e-6).sum()),
        "stats": st.stats()["worker"],
    }
    by_transport = {}
    for transport in ("separate", "regenerate"):
        kw = dict(loss_rate=0.3, mtu=400, fill="rescale", fec=(4, 1), retransmit=1, seed=6)
        st = LossyState(counts_transport=transport, **kw)
        by_transport[transport] = (run_steps(st, sizes, 10), st.stats()["worker"])
    a, b = by_transport["separate"][0], by_transport["regenerate"][0]
    return {
        "transports_max_rel_diff": float((a - b).abs().max() / a.abs().max()),
        "transports_zero_packets_same": bool(torch.equal(a == 0, b == 0)),
        "fec_stats": by_transport["separate"][1],
        "fec_stats_regenerate": by_transport["regenerate"][1],
        "protect": protect,
    }


SCENARIOS = {
    f.__name__: f for f in (hadamard, hadamard_default, error_feedback, wire_dtypes, protect_and_recover)
}


if __name__ == "__main__":
    worker_main(SCENARIOS)

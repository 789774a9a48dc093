"""One rank of a Gloo launch (see launch.py) exercising the lossy FSDP2 collectives: the
collectives called directly on inputs whose values say who sent them, and inside real
``fully_shard`` training. Usage: fsdp_worker.py OUT.json SCENARIO [...]"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from lossy_hooks import LossyState, fsdp
from lossy_hooks.core.pipeline.sharded import ShardedCollectives

try:  # run as a script (tests/ on sys.path) or imported from the tests package
    from launch import worker_main
except ImportError:
    from tests.launch import worker_main

S = 1000  # elements per row (shard)
MTU = 400  # 100 fp32 elements per packet: 10 packets per row
PACKET = 100
CALLS = 200


def scatter_comm(state: LossyState) -> fsdp.LossyReduceScatter:
    return fsdp.LossyReduceScatter(ShardedCollectives(state, 1), 0, "probe")


def gather_comm(state: LossyState) -> fsdp.LossyAllGather:
    return fsdp.LossyAllGather(ShardedCollectives(state, 0), 0, "probe")


def scatter(comm: fsdp.LossyReduceScatter, rows: torch.Tensor, op: Any = dist.ReduceOp.AVG) -> torch.Tensor:
    out = torch.empty(S)
    comm(out, rows.reshape(-1).clone(), dist.group.WORLD, op)
    return out


def per_packet(x: torch.Tensor) -> list[float]:
    """The value of each packet (asserting every element of a packet agrees)."""
    p = x.view(-1, PACKET)
    assert bool((p == p[:, :1]).all()), "a packet is not uniform"
    return p[:, 0].tolist()


def marked_rows(world: int, rank: int, t: int = 0) -> torch.Tensor:
    """This rank's contribution to every shard: ``(t + 1) * 2^rank`` everywhere."""
    return torch.full((world, S), float((t + 1) * 2**rank))


def scatter_worker() -> dict[str, Any]:
    """Worker drop at 30%: zero fill (sum: the result's bits say whose copies arrived),
    rescale by regenerated and by separately reduced counts (the same masks: same seed)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    out: dict[str, Any] = {}
    for name, kw in {
        "zero": dict(fill="zero", reduction="sum"),
        "regenerate": dict(fill="rescale", counts_transport="regenerate"),
        "separate": dict(fill="rescale", counts_transport="separate"),
    }.items():
        state = LossyState(loss_rate=0.3, mtu=MTU, drop_point="worker", seed=7, **kw)
        comm = scatter_comm(state)
        values = [per_packet(scatter(comm, marked_rows(world, rank))) for _ in range(CALLS)]
        st = state.stats()
        out[name] = {
            "values": values,
            "sent": st["worker"]["packets_sent"],
            "lost": st["worker"]["packets_lost"],
        }
        out[name]["steps"] = state.steps
        out[name]["buckets"] = st["buckets"]
    return out


def retransmit() -> dict[str, Any]:
    """Retransmission under FSDP at 30%, one resend: worker drop, zero fill (the sums name
    the contributions that arrived) with its counters; post drop, rescale by 1/(1-p^2), on a
    shared and an independent mask (the same mask on every rank when shared)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    state = LossyState(loss_rate=0.3, mtu=MTU, fill="zero", reduction="sum", retransmit=1, seed=21)
    comm = scatter_comm(state)
    values = [per_packet(scatter(comm, marked_rows(world, rank))) for _ in range(CALLS)]
    out: dict[str, Any] = {"worker": {"values": values, "stats": state.stats()["worker"]}}
    for sync in ("shared", "independent"):
        kw = dict(loss_rate=0.3, mtu=MTU, drop_point="post", post_sync=sync, reduction="sum", seed=22)
        post = LossyState(retransmit=1, **kw)
        comm = scatter_comm(post)
        got = [per_packet(scatter(comm, marked_rows(world, rank))) for _ in range(CALLS)]
        out[sync] = {"values": got, "stats": post.stats()["post"]}
    return out


def error_feedback() -> dict[str, Any]:
    """Error feedback under FSDP at 30% worker loss, zero fill, sum: the outputs of every call
    per packet, what each rank still owes each shard (its residual rows) at the end, and one
    more call from the state and from a state loaded from its state_dict (the same)."""
    world, rank = dist.get_world_size(), dist.get_rank()

    def make() -> LossyState:
        return LossyState(loss_rate=0.3, mtu=MTU, fill="zero", reduction="sum", error_feedback=True, seed=31)

    state = make()
    comm = scatter_comm(state)
    outs = [per_packet(scatter(comm, marked_rows(world, rank))) for _ in range(CALLS)]
    (record,) = [r for r in state.buckets.records.values()]
    owed = [per_packet(row) for row in record.residual.view(world, S)]
    saved = state.state_dict()
    again = make()
    again.load_state_dict(saved)
    after = scatter(comm, marked_rows(world, rank)).tolist()
    resumed = scatter(scatter_comm(again), marked_rows(world, rank)).tolist()
    return {"outs": outs, "owed": owed, "resumed_same": after == resumed, "lost": state.stats()["worker"]}


def scatter_post() -> dict[str, Any]:
    """Post drop at 25%, the shard of step t being (t+1) (2^W - 1) everywhere (sum)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    out: dict[str, Any] = {}
    for fill in ("zero", "rescale", "stale"):
        for sync in ("shared", "independent"):
            kw = dict(loss_rate=0.25, mtu=MTU, drop_point="post", post_sync=sync, reduction="sum", seed=3)
            comm = scatter_comm(LossyState(fill=fill, **kw))
            values = [per_packet(scatter(comm, marked_rows(world, rank, t))) for t in range(CALLS)]
            st = comm.pipeline.state.stats()["post"]
            out[f"{fill}-{sync}"] = {"values": values, "sent": st["packets_sent"], "lost": st["packets_lost"]}
    # the shared post mask, drawn from the post stream (seed alone) of a state like the one
    # above: one (W, n) mask per call, of which rank r must keep row r
    ref = LossyState(loss_rate=0.25, mtu=MTU, drop_point="post", post_sync="shared", seed=3)
    ref.post.prepare(torch.device("cpu"), 3, rank)
    n = S // PACKET
    out["shared_draw"] = [ref.post.draw(world * n).view(world, n).tolist() for _ in range(CALLS)]
    return out


def chain() -> dict[str, Any]:
    """The technique chain under the reduce-scatter (sum), each against a lossless
    reduce-scatter this rank runs itself on the same random rows: Hadamard at loss 0 (the
    decode with this rank's row's signs) and, at 30% worker loss with rescale, over CALLS
    calls (a new rotation each); a bf16 wire; the fidelity of a 30% zero-fill call."""
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = torch.randn(world, S, generator=torch.Generator().manual_seed(100 + rank))

    def lossless(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(S, dtype=x.dtype)
        dist.reduce_scatter_tensor(out, x.reshape(-1).clone(), op=dist.ReduceOp.SUM)
        return out

    exact = lossless(rows)
    sums = dict(mtu=MTU, reduction="sum", encoding="hadamard", hadamard_block=256)
    h0 = scatter(scatter_comm(LossyState(loss_rate=0.0, fill="zero", seed=5, **sums)), rows)
    lossy = scatter_comm(LossyState(loss_rate=0.3, seed=6, **sums))
    calls = torch.stack([scatter(lossy, rows) for _ in range(CALLS)])
    bf16 = scatter(scatter_comm(LossyState(loss_rate=0.0, mtu=MTU, reduction="sum", wire_dtype="bf16")), rows)
    state = LossyState(loss_rate=0.3, mtu=MTU, fill="zero", reduction="sum", measure_fidelity=True, seed=7)
    zero = scatter(scatter_comm(state), rows)
    mine = state.fidelity()
    again = LossyState(loss_rate=0.3, mtu=MTU, fill="zero", reduction="sum", measure_fidelity=True, seed=7)
    scatter(scatter_comm(again), rows)
    return {
        "hadamard_rel_err": float((h0 - exact).norm() / exact.norm()),
        "hadamard_mean": calls.mean(0).tolist(),
        "hadamard_stderr": (calls.std(0) / CALLS**0.5).tolist(),
        "hadamard_lost": lossy.pipeline.state.stats()["worker"]["packets_lost"],
        "bf16_equal": bool(torch.equal(bf16, lossless(rows.bfloat16()).float())),
        "fp32_equal": bool(torch.equal(bf16, exact)),
        "fidelity": mine,
        "fidelity_all": again.fidelity(all_ranks=True),
        "zero_sums": [
            float(a.double() @ b.double()) for a, b in ((zero, exact), (zero, zero), (exact, exact))
        ],
    }


def bf16_factors() -> dict[str, Any]:
    """Post rescale of a bf16 shard (FSDP's reduce_dtype=bf16): the factor 1/(1-p) is applied
    in fp32 and the product rounded once, not rounded to bf16 first."""
    world, rank = dist.get_world_size(), dist.get_rank()
    comm = scatter_comm(LossyState(loss_rate=0.1, mtu=MTU, drop_point="post", reduction="sum", seed=4))
    out = torch.empty(S, dtype=torch.bfloat16)
    comm(
        out,
        torch.full((world * S,), float(2**rank), dtype=torch.bfloat16),
        dist.group.WORLD,
        dist.ReduceOp.AVG,
    )
    return {"values": sorted(set(out.float().tolist()))}


def gather() -> dict[str, Any]:
    """All-gather loss at 20%: rank q's shard at call t is 1000 (t + 1) + q everywhere."""
    world, rank = dist.get_world_size(), dist.get_rank()
    out: dict[str, Any] = {}
    for fill in ("zero", "stale"):
        for sync in ("independent", "shared"):
            state = fsdp.gather_state(loss_rate=0.2, fill=fill, post_sync=sync, mtu=MTU, seed=5)
            comm = gather_comm(state)
            values = []
            for t in range(CALLS):
                o = torch.empty(world * S)
                comm(o, torch.full((S,), 1000.0 * (t + 1) + rank), dist.group.WORLD)
                values.append([per_packet(row) for row in o.view(world, S)])
            st = state.stats()["post"]
            out[f"{fill}-{sync}"] = {"values": values, "sent": st["packets_sent"], "lost": st["packets_lost"]}
    return out


def resume() -> dict[str, Any]:
    """The loss sequence and stale values continue exactly from a state_dict (worker rescale
    and post rescale, counts regenerated; and the all-gather's stale fill)."""
    world, rank = dist.get_world_size(), dist.get_rank()

    def make() -> tuple[LossyState, LossyState]:
        s = LossyState(loss_rate=0.3, mtu=MTU, drop_point="both", fill="rescale", seed=11)
        return s, fsdp.gather_state(loss_rate=0.3, mtu=MTU, seed=12)

    def run(states: tuple[LossyState, LossyState], ts: range) -> list[list[float]]:
        rs, ag = scatter_comm(states[0]), gather_comm(states[1])
        res = []
        for t in ts:
            rows = torch.randn(world, S, generator=torch.Generator().manual_seed(100 * t + rank))
            o = torch.empty(world * S)
            ag(
                o,
                torch.randn(S, generator=torch.Generator().manual_seed(100 * t + rank + 50)),
                dist.group.WORLD,
            )
            res.append(scatter(rs, rows).tolist() + o.tolist())
        return res

    whole = run(make(), range(20))
    first = make()
    part = run(first, range(10))
    saved = [s.state_dict() for s in first]
    again = make()
    for s, sd in zip(again, saved, strict=True):
        s.load_state_dict(sd)
    rest = run(again, range(10, 20))
    fresh = run(make(), range(10, 20))  # without the state: another sequence
    return {
        "same_first_half": part == whole[:10],
        "resumed_equal": rest == whole[10:],
        "fresh_differs": fresh != whole[10:],
        "steps": again[0].steps,
    }


def model_and_data(seed: int) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(12, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
    )
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    data = [(torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(8)]
    return model, data


def shard(model: nn.Module) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def train(model: nn.Module, data: list, steps: int) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for i in range(steps):
        x, y = data[i % len(data)]
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


def full_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])


def training() -> dict[str, Any]:
    """Real fully_shard training: loss 0 with both collectives wired is bitwise plain FSDP2
    (mean and sum); lossy runs count packets and still learn."""
    out: dict[str, Any] = {}
    plain_model, data = model_and_data(0)
    plain = shard(plain_model)
    train(plain, data, 6)
    ref = full_params(plain)
    model, data = model_and_data(0)
    model = shard(model)
    state, ag = LossyState(loss_rate=0.0, mtu=MTU), fsdp.gather_state(loss_rate=0.0, mtu=MTU)
    out["wired"] = fsdp.register(model, state, all_gather=ag)
    train(model, data, 6)
    out["bitwise"] = bool(torch.equal(full_params(model), ref))
    out["lossless_steps"] = state.steps
    out["lossless_sent"] = state.stats()["worker"]["packets_sent"]
    out["gather_sent"] = ag.stats()["post"]["packets_sent"]
    # reduction="sum": FSDP's average becomes a sum; SGD on a W-times larger gradient with lr / W
    # is the same step up to rounding
    model, data = model_and_data(0)
    model = shard(model)
    fsdp.register(model, LossyState(loss_rate=0.0, mtu=MTU, reduction="sum"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1 / dist.get_world_size())
    x, y = data[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    plain_model, _ = model_and_data(0)
    plain = shard(plain_model)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    nn.functional.cross_entropy(plain(x), y).backward()
    opt.step()
    out["sum_max_diff"] = float((full_params(model) - full_params(plain)).abs().max())
    # fully_shard([a, b]) makes one unit of two modules: one reduce-scatter, one index
    grouped, _ = model_and_data(0)
    fully_shard([grouped[0], grouped[3]])
    fully_shard(grouped)
    out["grouped"] = fsdp.register(grouped, LossyState(loss_rate=0.0, mtu=MTU))
    # lossy: worker rescale 20% + all-gather stale 10%
    model, data = model_and_data(0)
    model = shard(model)
    state = LossyState(loss_rate=0.2, mtu=MTU, drop_point="worker", seed=1)
    ag = fsdp.gather_state(loss_rate=0.1, mtu=MTU, seed=2)
    fsdp.register(model, state, all_gather=ag)
    losses = train(model, data, 24)
    out["lossy_first_last"] = [sum(losses[:8]) / 8, sum(losses[-8:]) / 8]
    out["lossy_worker"] = state.stats(all_ranks=True)["worker"]
    out["lossy_gather"] = ag.stats(all_ranks=True)["post"]
    out["lossy_steps"] = state.steps
    return out


def no_host_sync() -> dict[str, list[str]]:
    """Every configuration path of the two collectives, called twice each under
    forbid_host_sync after a first call (records made): the calls that would wait for a GPU."""
    try:
        from host_sync_guard import forbid_host_sync
    except ImportError:
        from tests.multiprocess.host_sync_guard import forbid_host_sync
    from lossy_hooks import GilbertElliott

    world, rank = dist.get_world_size(), dist.get_rank()
    configs = {
        "worker zero": dict(fill="zero"),
        "worker rescale regenerate": dict(counts_transport="regenerate"),
        "worker rescale separate": dict(counts_transport="separate"),
        "post rescale shared": dict(drop_point="post"),
        "post zero independent": dict(drop_point="post", fill="zero", post_sync="independent"),
        "post stale": dict(drop_point="post", fill="stale"),
        "both rescale": dict(drop_point="both"),
        "sum": dict(reduction="sum", fill="zero"),
    }
    out: dict[str, list[str]] = {}
    for name, kw in configs.items():
        comm = scatter_comm(LossyState(loss_rate=0.2, mtu=MTU, **kw))
        scatter(comm, marked_rows(world, rank))
        with forbid_host_sync() as seen:
            for _ in range(2):
                scatter(comm, marked_rows(world, rank))
        out[name] = seen
    for fill in ("stale", "zero"):
        for model in (None, GilbertElliott(0.05, 0.3)):
            kw = dict(loss_rate=0.2) if model is None else dict(loss_model=model)
            comm = gather_comm(fsdp.gather_state(fill=fill, mtu=MTU, **kw))
            o = torch.empty(world * S)
            comm(o, torch.ones(S), dist.group.WORLD)
            with forbid_host_sync() as seen:
                for _ in range(2):
                    comm(o, torch.ones(S), dist.group.WORLD)
            out[f"gather {fill} {'gemodel' if model else 'random'}"] = seen
    return out


def layout() -> dict[str, Any]:
    """The units and packets bucket_layout's fsdp_layout computes for gpt-tiny at W ranks
    (FSDP's padding rule, no process group) and those the real reduce-scatter counted."""
    import copy

    from lossy_hooks.study.parallel import parallelize
    from lossy_hooks.study.workloads.gpt import build_gpt
    from lossy_hooks.tools.bucket_layout import fsdp_layout

    torch.manual_seed(0)
    model = build_gpt("gpt-tiny")
    predicted = fsdp_layout(copy.deepcopy(model), dist.get_world_size(), MTU)
    state = LossyState(loss_rate=0.1, mtu=MTU)
    parallelize(model, "fsdp", state, None, torch.device("cpu"), 25.0)
    x = torch.randint(0, 256, (2, 64))
    nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    seen = {b["index"]: b for b in state.stats()["buckets"]}
    return {
        "predicted": [(u["unit"], u["padded_elements"], u["packets_per_shard"]) for u in predicted["units"]],
        "seen": [(seen[i]["numel"], seen[i]["packets"]) for i in sorted(seen)],
        "labels": [e.label for _, e in sorted(state.ledger.buckets.items())],
    }


if __name__ == "__main__":
    worker_main(
        {"scatter_worker": scatter_worker, "scatter_post": scatter_post, "gather": gather, "resume": resume}
        | {"retransmit": retransmit, "error_feedback": error_feedback, "chain": chain}
        | {"training": training, "layout": layout, "no_host_sync": no_host_sync, "bf16_factors": bf16_factors}
    )

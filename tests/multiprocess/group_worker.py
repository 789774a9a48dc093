"""One rank of a Gloo launch (see launch.py) exercising ``lossy_group``: at loss 0 the same
numbers as the plain group under DDP, FSDP2, DTensor tensor parallelism, pipelining and
all-to-all; with loss, every kind's received values (which say who sent them) decoded
into loss masks; control traffic; the stale fill; a resume. Usage: group_worker.py OUT.json SCENARIO [...]"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel as DDP

from lossy_hooks import LossyState, lossy_allreduce_hook, lossy_group, reliable

try:  # run as a script (tests/ on sys.path) or imported from the tests package
    from launch import worker_main
    from moe_worker import against_reference as moe_reference
    from moe_worker import lossy as moe_lossy
except ImportError:
    from tests.launch import worker_main
    from tests.multiprocess.moe_worker import against_reference as moe_reference
    from tests.multiprocess.moe_worker import lossy as moe_lossy

MTU = 400  # 100 fp32 elements per packet
PACKET = 100
CALLS = 60
P = 0.2


def rank_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 8))


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def ddp_steps(group: Any) -> list[torch.Tensor]:
    rank, _ = rank_world()
    model = DDP(mlp(), process_group=group)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        torch.manual_seed(100 + 10 * step + rank)
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def fsdp_steps(group: Any) -> list[torch.Tensor]:
    from torch.distributed.fsdp import fully_shard

    rank, _ = rank_world()
    model = mlp()
    mesh = DeviceMesh.from_group(group, "cpu")
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        torch.manual_seed(200 + 10 * step + rank)
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def tp_step(group: Any) -> list[torch.Tensor]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = mlp()
    mesh = DeviceMesh.from_group(group, "cpu")
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    torch.manual_seed(300)
    out = model(torch.randn(4, 8))
    out.square().mean().backward()
    return [out.detach().clone(), *(p.grad.full_tensor().clone() for p in model.parameters())]


def pipeline_step(schedule: Any, x: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """One step of a pipeline schedule from this rank's side: the first stage feeds ``x``, the
    last the ``target`` and gets the micro-batch losses (returned; empty elsewhere)."""
    rank, world = rank_world()
    losses: list[torch.Tensor] = []
    if rank == 0:
        schedule.step(x)
    elif rank == world - 1:
        schedule.step(target=target, losses=losses)
    else:
        schedule.step()
    return losses


def pp_step(group: Any) -> list[torch.Tensor]:
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    rank, world = rank_world()
    torch.manual_seed(0)
    stages = [nn.Linear(8, 8) for _ in range(world)]
    stage = PipelineStage(stages[rank], rank, world, torch.device("cpu"), group=group)
    schedule = ScheduleGPipe(
        stage, n_microbatches=4, loss_fn=lambda out, target: (out - target).square().mean()
    )
    torch.manual_seed(400)
    x, target = torch.randn(8, 8), torch.randn(8, 8)
    losses = pipeline_step(schedule, x, target)
    return [*(t.detach().clone() for t in losses), *(p.grad.clone() for p in stages[rank].parameters())]


def a2a_uneven(group: Any) -> list[torch.Tensor]:
    rank, world = rank_world()
    in_splits = [(rank + j) % world + 1 for j in range(world)]  # what rank sends to j
    out_splits = [(j + rank) % world + 1 for j in range(world)]  # what j sends here
    data = torch.arange(sum(in_splits), dtype=torch.float32) + 100 * rank
    out = torch.empty(sum(out_splits))
    dist.all_to_all_single(out, data, out_splits, in_splits, group=group)
    return [out]


def lossless() -> dict[str, Any]:
    """Loss 0 through the lossy group: bitwise the plain group's numbers."""
    plain = dist.new_group(backend="gloo")
    state = LossyState(loss_rate=0.0, fill="zero", mtu=MTU)
    lossy = lossy_group(state)
    out = {}
    for name, run in (
        ("ddp", ddp_steps),
        ("fsdp", fsdp_steps),
        ("tp", tp_step),
        ("pp", pp_step),
        ("a2a", a2a_uneven),
    ):
        out[name] = same(run(plain), run(lossy))
    out["collectives"] = state.stats()["collectives"]
    return out


def fill_value(t: torch.Tensor, base: float) -> torch.Tensor:
    """Values that say who sent them and where: ``base + 1 + index`` (never 0)."""
    return t.copy_(base + 1 + torch.arange(t.numel(), dtype=t.dtype).view_as(t))


def delivered(kind_calls: Any, state: LossyState) -> dict[str, Any]:
    """Per call, per packet received from another rank: 1 arrived, 0 lost (decoded from the
    received values: a lost packet is all zeros, an arrived one exact)."""
    arrived: list[list[int]] = []
    for received, expected, remote in kind_calls():
        for got, want, crosses in zip(received, expected, remote, strict=True):
            if not crosses:
                assert torch.equal(got, want)
                continue
            for start in range(0, got.numel(), PACKET):
                g, w = got[start : start + PACKET], want[start : start + PACKET]
                if torch.equal(g, w):
                    arrived.append([1])
                else:
                    assert torch.all(g == 0), "a lost packet is zero, the rest exact"
                    arrived.append([0])
    return {"arrived": sum(a[0] for a in arrived), "packets": len(arrived)}


def rates() -> dict[str, Any]:
    """Every kind at P = 0.2, zero fill: what arrived, decoded, and what the state counted."""
    rank, world = rank_world()
    state = LossyState(loss_rate=P, fill="zero", mtu=MTU, seed=7)
    group = lossy_group(state)
    out: dict[str, Any] = {}

    def gather_calls():
        for t in range(CALLS):
            mine = fill_value(torch.empty(250), 1000 * rank + t)
            got = torch.empty(world * 250)
            dist.all_gather_into_tensor(got, mine, group=group)
            want = [fill_value(torch.empty(250), 1000 * j + t) for j in range(world)]
            yield list(got.view(world, 250)), want, [j != rank for j in range(world)]

    def a2a_calls():
        for t in range(CALLS):
            in_splits = [130 * ((rank + j) % world + 1) for j in range(world)]
            out_splits = [130 * ((j + rank) % world + 1) for j in range(world)]
            data = torch.cat(
                [fill_value(torch.empty(n), 1000 * rank + 10 * j + t) for j, n in enumerate(in_splits)]
            )
            got = torch.empty(sum(out_splits))
            dist.all_to_all_single(got, data, out_splits, in_splits, group=group)
            want = [fill_value(torch.empty(n), 1000 * j + 10 * rank + t) for j, n in enumerate(out_splits)]
            yield list(got.split(out_splits)), want, [j != rank for j in range(world)]

    def broadcast_calls():
        for t in range(CALLS):
            root = t % world
            x = fill_value(torch.empty(330), 1000 * root + t) if rank == root else torch.zeros(330)
            dist.broadcast(x, src=root, group=group)
            yield [x], [fill_value(torch.empty(330), 1000 * root + t)], [rank != root]

    def p2p_calls():
        for t in range(CALLS):
            nxt, prv = (rank + 1) % world, (rank - 1) % world
            x = fill_value(torch.empty(270), 1000 * rank + t)
            got = torch.zeros(270)
            ops = [dist.P2POp(dist.irecv, got, prv, group), dist.P2POp(dist.isend, x, nxt, group)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            yield [got], [fill_value(torch.empty(270), 1000 * prv + t)], [True]

    for kind, calls in (
        ("all_gather", gather_calls),
        ("all_to_all", a2a_calls),
        ("broadcast", broadcast_calls),
        ("p2p", p2p_calls),
    ):
        out[kind] = delivered(calls, state)
    # reductions: rank r sends 2**r, so a zero-fill sum names the contributions that arrived
    sums = []
    for _ in range(CALLS):
        x = torch.full((1000,), float(2**rank))
        dist.all_reduce(x, group=group)
        sums.append(x.view(-1, PACKET)[:, 0].tolist())
    out["all_reduce"] = sums
    shards = []
    for _ in range(CALLS):
        rows = torch.full((world * 500,), float(2**rank))
        got = torch.empty(500)
        dist.reduce_scatter_tensor(got, rows, group=group)
        shards.append(got.view(-1, PACKET)[:, 0].tolist())
    out["reduce_scatter"] = shards
    out["collectives"] = state.stats()["collectives"]
    out["collectives_all"] = state.stats(all_ranks=True)["collectives"]
    return out


def control() -> dict[str, Any]:
    """Loss 0.5 on every kind: control traffic arrives whole."""
    rank, world = rank_world()
    state = LossyState(loss_rate=0.5, fill="zero", mtu=MTU, seed=3)
    group = lossy_group(state)
    objects: list[Any] = [None] * world
    dist.all_gather_object(objects, {"rank": rank, "payload": list(range(500))}, group=group)
    ints = torch.arange(5000) + rank
    dist.all_reduce(ints, group=group)
    peak = torch.full((5000,), float(rank))
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    with reliable():
        marked = torch.ones(5000)
        dist.all_reduce(marked, group=group)
        functional = funcol.all_reduce(torch.ones(5000), "sum", group).wait()
    dist.barrier(group=group)
    lossy = torch.ones(5000)
    dist.all_reduce(lossy, group=group)
    return {
        "objects": objects == [{"rank": j, "payload": list(range(500))} for j in range(world)],
        "ints": torch.equal(ints, torch.arange(5000) * world + sum(range(world))),
        "max": torch.equal(peak, torch.full((5000,), float(world - 1))),
        "marked": torch.equal(marked, torch.full((5000,), float(world))),
        "functional": torch.equal(functional, torch.full((5000,), float(world))),
        "lossy_differs": not torch.equal(lossy, torch.full((5000,), float(world))),
        "kinds": sorted(state.stats()["collectives"]),
    }


def stale() -> dict[str, Any]:
    """Stale fill on messages: a lost packet keeps the last value received from that peer,
    with that tag and shape."""
    rank, world = rank_world()
    state = LossyState(loss_rate=0.3, fill="stale", drop_point="post", mtu=MTU, seed=5)
    group = lossy_group(state, kinds=("p2p",))
    ok, lost, last = True, 0, torch.zeros(400)
    for t in range(40):
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        got = torch.zeros(400)
        ops = [
            dist.P2POp(dist.irecv, got, prv, group),
            dist.P2POp(dist.isend, fill_value(torch.empty(400), t), nxt, group),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        want = fill_value(torch.empty(400), t)
        for s in range(0, 400, PACKET):
            if torch.equal(got[s : s + PACKET], want[s : s + PACKET]):
                continue
            lost += 1
            ok &= torch.equal(got[s : s + PACKET], last[s : s + PACKET])
        last = got.clone()
    return {"ok": bool(ok), "lost": lost, "counted": state.stats()["collectives"]["p2p"]["packets_lost"]}


def resume() -> dict[str, Any]:
    """state_dict after 5 calls of each kind, then 5 more: a state loaded from it loses the same packets."""
    rank, world = rank_world()

    def calls(state: LossyState, group: Any) -> list[torch.Tensor]:
        outs = []
        for t in range(5):
            got = torch.empty(world * 300)
            dist.all_gather_into_tensor(got, fill_value(torch.empty(300), t), group=group)
            x = torch.full((700,), float(2**rank))
            dist.all_reduce(x, group=group)
            outs += [got, x]
        return outs

    state = LossyState(loss_rate=0.3, fill="zero", mtu=MTU, seed=11)
    group = lossy_group(state)
    calls(state, group)
    saved = copy.deepcopy(state.state_dict())
    first = calls(state, group)
    again = LossyState(loss_rate=0.3, fill="zero", mtu=MTU, seed=11)
    again.load_state_dict(saved)
    second = calls(again, lossy_group(again))
    return {"same": same(first, second), "lost_any": any(bool((t == 0).any()) for t in first)}


def nodes_and_streams() -> dict[str, Any]:
    """ranks_per_node = 2 at W = 3: chunks between ranks 0 and 1 never lost; an AVG all-reduce
    (which Gloo lacks) is the mean; and all-reduce traffic does not shift the all-to-all's
    losses (each kind draws from its own stream)."""
    rank, world = rank_world()
    state = LossyState(loss_rate=0.5, fill="zero", mtu=MTU, seed=9, algorithm="direct", ranks_per_node=2)
    group = lossy_group(state, kinds=("all_to_all",))
    intact = [True] * world
    for _ in range(20):
        got = torch.empty(world * 300)
        dist.all_to_all_single(got, fill_value(torch.empty(world * 300), 0.0), group=group)
        for j, chunk in enumerate(got.view(world, 300)):
            intact[j] &= bool(
                torch.equal(chunk, fill_value(torch.empty(world * 300), 0.0).view(world, 300)[rank])
            )
    mean = torch.full((1000,), float(rank))
    averaging = lossy_group(LossyState(loss_rate=0.0), kinds="all_reduce")
    dist.all_reduce(mean, op=dist.ReduceOp.AVG, group=averaging)

    def a2a_losses(interleave: bool) -> list[torch.Tensor]:
        state = LossyState(loss_rate=0.3, fill="zero", mtu=MTU, seed=13)
        group = lossy_group(state)
        outs = []
        for t in range(5):
            if interleave:
                dist.all_reduce(torch.ones(900), group=group)
            got = torch.empty(world * 200)
            dist.all_to_all_single(got, fill_value(torch.empty(world * 200), t), group=group)
            outs.append(got)
        return outs

    return {
        "intact": intact,
        "avg": torch.allclose(mean, torch.full((1000,), (world - 1) / 2)),
        "streams_apart": same(a2a_losses(False), a2a_losses(True)),
    }


def subgroups() -> dict[str, Any]:
    """``lossy_subgroups`` over the groups [0, 1] and [2] (each rank its own state), and
    gpt-tiny made tensor-parallel on this rank's group: at loss 0 the loss and the gradient
    of the (replicated) token embedding against the unsharded model, the all-reduces
    counted; at 20% worker loss (zero fill) the packets lost and the loss moved; the same at
    loss 0 with sequence parallelism (:func:`sequence_parallel_step`). Then overlapping lists
    are refused."""
    from lossy_hooks import lossy_subgroups
    from lossy_hooks.study.workloads.gpt import build_gpt, tensor_parallel

    lists = [[0, 1], [2]]
    out: dict[str, Any] = {}
    for p in (0.0, P):
        state = LossyState(loss_rate=p, fill="zero", mtu=1500, seed=9)
        group = lossy_subgroups(state, lists, kinds=("all_reduce",))
        torch.manual_seed(0)
        model = build_gpt("gpt-tiny")
        ref = copy.deepcopy(model)
        with reliable():
            # a mesh over the same ranks as an earlier one must be named apart: DTensor would
            # otherwise take the earlier mesh (and its group) for it
            tensor_parallel(model, DeviceMesh.from_group(group, "cpu", mesh_dim_names=(f"tp{p}",)))
        x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(5))
        losses = []
        for m in (model, ref):
            loss = nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten())
            loss.backward()
            losses.append(float(loss.detach()))
        grads = (model.tok.weight.grad - ref.tok.weight.grad).abs().max() / ref.tok.weight.grad.abs().max()
        counted = state.stats().get("collectives", {}).get("all_reduce", {})  # none on a group of one
        out[str(p)] = {"losses": losses, "grad_err": float(grads), **counted}
    out["sequence_parallel"] = sequence_parallel_step(lists)
    try:
        lossy_subgroups(LossyState(loss_rate=0.1, fill="zero"), [[0, 1], [1, 2]])
        out["overlap_refused"] = False
    except ValueError as error:
        out["overlap_refused"] = "disjoint" in str(error)
    return out


def sequence_parallel_step(lists: list[list[int]]) -> dict[str, Any]:
    """Tensor and sequence parallelism on this rank's group of ``lists`` at loss 0: gpt-tiny
    whole (``"whole"``: 2 blocks), a 1-block GPT (``"one_block"``: one block splits and
    gathers the stream), the first of 2 pipeline stages of gpt-tiny (``"stage0"``: it sends
    this rank's half of the positions, not gathered) and moe-tiny whole (``"moe"``). The
    loss (of the rank's half for the stage, over the whole output's size, so that the ranks'
    losses sum to the model's),
    the embedding's and the first norm's gradients (partial sums reduced) against the
    unsharded model; the calls and packets of every kind."""
    from lossy_hooks import lossy_subgroups
    from lossy_hooks.study.workloads.gpt import GPT, GPT_CONFIGS, GPTStage, build_gpt, tensor_parallel

    state = LossyState(loss_rate=0.0, fill="zero", mtu=1500, seed=9)
    group = lossy_subgroups(state, lists, kinds=("all_reduce", "all_gather", "reduce_scatter"))
    mesh = DeviceMesh.from_group(group, "cpu", mesh_dim_names=("tp-sp",))
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(5))
    one_block = dataclasses.replace(GPT_CONFIGS["gpt-tiny"], n_layer=1)
    builds = {
        "whole": lambda: GPTStage(build_gpt("gpt-tiny"), 0, 1),
        "one_block": lambda: GPTStage(GPT(one_block), 0, 1),
        "stage0": lambda: GPTStage(build_gpt("gpt-tiny"), 0, 2),
        "moe": lambda: GPTStage(build_gpt("moe-tiny"), 0, 1),  # the MoE layer on the gathered sequence
    }
    out: dict[str, Any] = {}
    for case, build in builds.items():
        torch.manual_seed(0)
        model = build()
        ref = copy.deepcopy(model)
        with reliable():
            tensor_parallel(model, mesh, sequence_parallel=True)
        norm = model.blocks[0].ln1.weight  # a parameter (DTensor); after the forward an attribute
        before = state.stats().get("collectives", {})
        whole = ref(x).float()
        mine = model(x).float()  # the stage: this rank's positions of the hidden states
        half = whole.chunk(group.size(), dim=1)[group.rank()] if case == "stage0" else whole
        losses = [mine.square().sum() / whole.numel(), half.square().sum() / whole.numel()]
        losses[0].backward()
        whole.square().mean().backward()
        pairs = {"tok": (model.tok.weight.grad, ref.tok.weight.grad)}
        pairs["ln1"] = (norm.grad.full_tensor(), ref.blocks[0].ln1.weight.grad)
        err = {k: (a - b).abs().max() / b.abs().max() for k, (a, b) in pairs.items()}
        after = state.stats().get("collectives", {})
        keys = ("calls", "packets_sent", "packets_lost")
        counts = {kind: {k: after[kind][k] - before.get(kind, {}).get(k, 0) for k in keys} for kind in after}
        out[case] = {
            "losses": [float(v.detach()) for v in losses],
            "shape": list(mine.shape),
            **{k: float(v) for k, v in err.items()},
            "counts": counts,
        }
    return out


def pipeline() -> dict[str, Any]:
    """gpt-small in 3 pipeline stages (GPTStage: 2, 1, 1 blocks) over the lossy group (p2p),
    GPipe with 2 micro-batches: at loss 0 the last stage's micro-batch losses are the whole
    model's and so are every stage's gradients (GPipe scales them by 1/2), to round-off; at
    20% (zero fill) the p2p
    packets counted and lost, the losses moved."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from lossy_hooks.study.workloads.gpt import GPTStage, build_gpt

    rank, world = rank_world()
    x = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(6))

    def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())

    out: dict[str, Any] = {}
    for p in (0.0, P):
        state = LossyState(loss_rate=p, fill="zero", mtu=1500, seed=11)
        group = lossy_group(state, kinds=("p2p",))
        torch.manual_seed(0)
        model = build_gpt("gpt-small")
        ref = copy.deepcopy(model)
        part = GPTStage(model, rank, world)
        stage = PipelineStage(part, rank, world, torch.device("cpu"), group=group)
        schedule = ScheduleGPipe(stage, n_microbatches=2, loss_fn=ce)
        losses = pipeline_step(schedule, x, x)
        expected = [ce(ref(m), m) for m in x.chunk(2)]
        sum(expected).backward()
        grads = [
            (a.grad, b.grad)
            for a, b in zip(part.parameters(), GPTStage(ref, rank, world).parameters(), strict=True)
        ]
        counted = state.stats().get("collectives", {}).get("p2p", {})
        out[str(p)] = {
            "losses": [float(t.detach()) for t in losses],
            "expected": [float(t.detach()) for t in expected],
            "grad_err": max(
                float((a - b / 2).abs().max() / (b / 2).abs().max().clamp_min(1e-30)) for a, b in grads
            ),
            **counted,
        }
    return out


def refusals() -> dict[str, Any]:
    """A DDP hook on a group that already loses all-reduces is refused when it runs."""
    state = LossyState(loss_rate=0.1, fill="zero")
    group = lossy_group(state, kinds=("all_reduce",))
    try:
        lossy_group(LossyState(loss_rate=0.1, fill="zero"), group)
        twice = False
    except ValueError as error:
        twice = "lossy_group already" in str(error)
    hooked = DDP(mlp(), process_group=group)
    hooked.register_comm_hook(LossyState(loss_rate=0.1, process_group=group), lossy_allreduce_hook)
    try:
        with reliable():  # the refusal, not a loss, must stop it
            hooked(torch.randn(2, 8)).sum().backward()
    except Exception as error:  # DDP re-raises the hook's error
        return {"refused": "apply twice" in str(error), "wrapped_twice_refused": twice}
    return {"refused": False, "wrapped_twice_refused": twice}


if __name__ == "__main__":
    worker_main(
        {"lossless": lossless, "rates": rates, "control": control, "stale": stale}
        | {"resume": resume, "nodes_and_streams": nodes_and_streams, "refusals": refusals}
        | {
            "subgroups": subgroups,
            "pipeline": pipeline,
            "moe_reference": moe_reference,
            "moe_lossy": moe_lossy,
        }
    )

"""Runs as one rank of a Gloo group (see launch.py): the per-hop placements' fast path (the
hook around the real allreduce) against literal ring / tree / direct algorithms written with
point-to-point isend/irecv that apply the same hop losses from the same streams, and the
numbers test_placements.py checks against closed forms.
Usage: placement_worker.py OUT.json SCENARIO [...]"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lossy_hooks import LossyState, lossy_allreduce_hook
from lossy_hooks.core.network import NetworkModel

try:  # run as a script (tests/ on sys.path) or imported from the tests package
    from launch import worker_main
    from nccl_trees import nccl_tree_parents
except ImportError:
    from tests.launch import worker_main
    from tests.nccl_trees import nccl_tree_parents

ALGORITHMS = ("ring", "tree", "dbtree", "direct")
CASES = [("worker", "zero"), ("worker", "rescale"), ("post", "zero"), ("post", "rescale"), ("post", "stale")]
CASES += [("both", "zero"), ("both", "rescale")]
P = 0.3


class Probe(nn.Module):
    """One parameter whose gradient is exactly the input value."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))

    def forward(self, x: float) -> torch.Tensor:
        return (self.w * x).sum()


def hook_steps(state: LossyState, n: int, steps: int, value: float) -> list[torch.Tensor]:
    ddp = DDP(Probe(n), bucket_cap_mb=25)
    ddp.register_comm_hook(state, lossy_allreduce_hook)
    out = []
    for _ in range(steps):
        ddp.zero_grad(set_to_none=True)
        ddp(value).backward()
        out.append(ddp.module.w.grad.detach().clone())
    return out


# ------------------------------------------------------------------ the literal algorithms


class Literal:
    """One rank's literal run of an algorithm on a bucket ``g`` (elements) of ``n`` packets
    of ``k`` elements: messages are (values, counts, hops) per packet; a receiver applies the
    hop's keep row from the oracle state's own draw (the same streams as the hook's)."""

    def __init__(self, oracle: LossyState, algorithm: str, k: int, n: int, world: int, rank: int) -> None:
        self.oracle, self.algorithm, self.k, self.n = oracle, algorithm, k, n
        self.world, self.rank = world, rank
        self.shapes = oracle.placement.shapes(world)  # only for the rows' names: (link, step) -> row
        chunks = {"ring": world, "direct": world, "tree": 1, "dbtree": 2}[algorithm]
        self.chunks = np.array_split(np.arange(n), chunks)
        self.tag = 0

    def row(self, phase: str, link: tuple[int, int], step: int) -> int:
        shape = self.shapes[phase]
        return shape.links.index(link) * shape.steps + step

    def elems(self, c: int) -> slice:
        packets = self.chunks[c]
        return slice(int(packets[0]) * self.k, int(packets[-1] + 1) * self.k) if len(packets) else slice(0, 0)

    def exchange(
        self, sends: list[tuple[int, list[torch.Tensor]]], recvs: list[tuple[int, list[torch.Tensor]]]
    ):
        """Post every isend/irecv of one step (tags in posting order), then wait."""
        works = []
        for peer, tensors in sends:
            works += [dist.isend(t.contiguous(), peer, tag=self.tag + i) for i, t in enumerate(tensors)]
        for peer, tensors in recvs:
            works += [dist.irecv(t, peer, tag=self.tag + i) for i, t in enumerate(tensors)]
        for w in works:
            w.wait()
        self.tag += 10

    def run(self, g: torch.Tensor, drop_point: str, fill: str, stale: torch.Tensor) -> torch.Tensor:
        reduce_keep = post_keep = None
        hops = self.oracle.hops
        assert hops is not None
        if drop_point in ("worker", "both"):
            reduce_keep = hops.draw("reduce", self.n, g.device)
        if drop_point in ("post", "both"):
            post_keep = hops.draw("broadcast", self.n, g.device)
        counter: dict[tuple[str, tuple[int, int]], int] = {}  # transmissions per link so far

        def keep_of(phase: str, table, link: tuple[int, int], c: int) -> torch.Tensor:
            step = counter.get((phase, link), 0)
            counter[(phase, link)] = step + 1
            if table is None:
                return torch.ones(len(self.chunks[c]), dtype=torch.bool)
            return table[self.row(phase, link, step), : len(self.chunks[c])]

        self.counter = counter
        self.keep_of = lambda phase, link, c: keep_of(
            phase, reduce_keep if phase == "reduce" else post_keep, link, c
        )
        values, counts, have, hops_made = getattr(self, self.algorithm)(g)
        if fill == "rescale" and drop_point in ("worker", "both"):
            values = values * (self.world / counts.float()).repeat_interleave(self.k)
        out = torch.where(have.repeat_interleave(self.k), values, torch.zeros_like(values))
        if fill == "rescale" and drop_point in ("post", "both"):
            q = (1.0 - P) ** hops_made.float()
            out = out / q.repeat_interleave(self.k)
        if fill == "stale":
            out = torch.where(have.repeat_interleave(self.k), values, stale)
            stale.copy_(out)
        return out

    # each returns per element values, per packet counts, received flags and hops travelled
    def ring(self, g: torch.Tensor):
        W, r = self.world, self.rank
        part, cnt = g.clone(), torch.ones(self.n, dtype=torch.int32)
        nxt, prv = (r + 1) % W, (r - 1) % W
        for s in range(W - 1):  # reduce-scatter
            send_c, recv_c = (r - s - 1) % W, (r - s - 2) % W
            e, pk = self.elems(recv_c), self.chunks[recv_c]
            got_v, got_c = torch.empty(e.stop - e.start), torch.empty(len(pk), dtype=torch.int32)
            se, sp = self.elems(send_c), self.chunks[send_c]
            self.exchange([(nxt, [part[se], cnt[sp]])], [(prv, [got_v, got_c])])
            kept = self.keep_of("reduce", (prv, r), recv_c)
            self.keep_of("reduce", (r, nxt), send_c)  # the link this rank sends on counts too
            part[e] = torch.where(kept.repeat_interleave(self.k), got_v, 0.0) + g[e]
            cnt[pk] = torch.where(kept, got_c, 0) + 1
        have = torch.zeros(self.n, dtype=torch.bool)
        hops = torch.zeros(self.n, dtype=torch.int32)
        have[self.chunks[r]] = True
        for s in range(W - 1):  # all-gather
            send_c, recv_c = (r - s) % W, (r - 1 - s) % W
            e, pk = self.elems(recv_c), self.chunks[recv_c]
            got = [
                torch.empty(e.stop - e.start),
                torch.empty(len(pk), dtype=torch.int32),
                torch.empty(len(pk), dtype=torch.bool),
                torch.empty(len(pk), dtype=torch.int32),
            ]
            se, sp = self.elems(send_c), self.chunks[send_c]
            self.exchange([(nxt, [part[se], cnt[sp], have[sp], hops[sp]])], [(prv, got)])
            kept = self.keep_of("broadcast", (prv, r), recv_c)
            self.keep_of("broadcast", (r, nxt), send_c)
            part[e], cnt[pk], hops[pk] = got[0], got[1], got[3] + 1
            have[pk] = got[2] & kept
        return part, cnt, have, hops

    def direct(self, g: torch.Tensor):
        W, r = self.world, self.rank
        mine = self.elems(r)
        total, cnt = g[mine].clone(), torch.ones(len(self.chunks[r]), dtype=torch.int32)
        got = {c: torch.empty(mine.stop - mine.start) for c in range(W) if c != r}
        self.exchange([(c, [g[self.elems(c)]]) for c in range(W) if c != r], [(c, [got[c]]) for c in got])
        for src in sorted(got):
            kept = self.keep_of("reduce", (src, r), r)
            total += torch.where(kept.repeat_interleave(self.k), got[src], 0.0)
            cnt += kept.to(torch.int32)
        part, counts = torch.zeros_like(g), torch.ones(self.n, dtype=torch.int32)
        have = torch.zeros(self.n, dtype=torch.bool)
        hops = torch.zeros(self.n, dtype=torch.int32)
        part[mine], counts[self.chunks[r]], have[self.chunks[r]] = total, cnt, True
        bufs = {
            c: (
                torch.empty(self.elems(c).stop - self.elems(c).start),
                torch.empty(len(self.chunks[c]), dtype=torch.int32),
            )
            for c in range(W)
            if c != r
        }
        self.exchange([(c, [total, cnt]) for c in range(W) if c != r], [(c, list(bufs[c])) for c in bufs])
        for c in sorted(bufs):
            kept = self.keep_of("broadcast", (c, r), c)
            part[self.elems(c)], counts[self.chunks[c]] = bufs[c]
            have[self.chunks[c]] = kept
            hops[self.chunks[c]] = 1
        return part, counts, have, hops

    def tree(self, g: torch.Tensor):
        # NCCL's trees built here (tests/nccl_trees.py), not by the package's helpers
        trees = [np.array(t) for t in nccl_tree_parents(self.world)][: 2 if self.algorithm == "dbtree" else 1]
        W, r = self.world, self.rank
        part, counts = g.clone(), torch.ones(self.n, dtype=torch.int32)
        have = torch.ones(self.n, dtype=torch.bool)
        hops = torch.zeros(self.n, dtype=torch.int32)
        for c, parent in enumerate(trees):  # reduce: children's partial sums up to the root
            e, pk = self.elems(c), self.chunks[c]
            for depth in self._levels(parent)[::-1]:  # deepest level first
                sends = [(int(parent[r]), [part[e], counts[pk]])] if r in depth and parent[r] != r else []
                kids = [x for x in depth if parent[x] == r and x != r]
                bufs = {
                    x: [torch.empty(e.stop - e.start), torch.empty(len(pk), dtype=torch.int32)] for x in kids
                }
                self.exchange(sends, [(x, bufs[x]) for x in kids])
                for x in sorted(kids):
                    kept = self.keep_of("reduce", (x, r), c)
                    part[e] += torch.where(kept.repeat_interleave(self.k), bufs[x][0], 0.0)
                    counts[pk] += torch.where(kept, bufs[x][1], 0)
                for x in range(W):  # the links other ranks use count too (the same order)
                    if x in depth and parent[x] != x and x != r and parent[x] != r:
                        self.keep_of("reduce", (x, int(parent[x])), c)
                if sends:
                    self.keep_of("reduce", (r, int(parent[r])), c)
        for c, parent in enumerate(trees):  # broadcast: the root's result down
            e, pk = self.elems(c), self.chunks[c]
            for depth in self._levels(parent)[1:]:
                recv = (
                    [(int(parent[r]), [part[e], counts[pk], have[pk].clone(), hops[pk].clone()])]
                    if r in depth
                    else []
                )
                sends = [(x, [part[e], counts[pk], have[pk], hops[pk]]) for x in depth if parent[x] == r]
                self.exchange(sends, recv)
                for x in depth:
                    kept = self.keep_of("broadcast", (int(parent[x]), x), c)
                    if x == r:
                        part[e], counts[pk] = recv[0][1][0], recv[0][1][1]
                        have[pk] = recv[0][1][2] & kept
                        hops[pk] = recv[0][1][3] + 1
        return part, counts, have, hops

    dbtree = tree  # the same literal code over both trees

    @staticmethod
    def _levels(parent: np.ndarray) -> list[list[int]]:
        depth = np.zeros(len(parent), dtype=int)
        for r in range(len(parent)):
            x = r
            while parent[x] != x:
                x, depth[r] = int(parent[x]), depth[r] + 1
        return [[int(r) for r in np.flatnonzero(depth == d)] for d in range(depth.max() + 1)]


# ------------------------------------------------------------------ scenarios


def oracle() -> dict:
    """For every algorithm, drop point and fill: the hook's result per step and packet
    against the literal algorithm's, integer-coded (rank r contributes 2**r)."""
    W, r = dist.get_world_size(), dist.get_rank()
    k, n, steps = 10, 17, 4  # 17 packets: chunks of unequal size at W = 2..5
    out = {}
    for algorithm in ALGORITHMS:
        for drop_point, fill in CASES:
            kw = dict(loss_rate=P, mtu=4 * k, algorithm=algorithm, drop_point=drop_point, fill=fill, seed=5)
            state = LossyState(reduction="sum", **kw)
            fast = hook_steps(state, n * k, steps, float(2**r))
            reference = LossyState(reduction="sum", **kw)
            assert reference.hops is not None
            reference.hops.prepare(torch.device("cpu"), 5, r, W)
            literal = Literal(reference, algorithm, k, n, W, r)
            stale = torch.zeros(n * k)
            g = torch.full((n * k,), float(2**r))
            worst, equal = 0.0, True
            for t in range(steps):
                expect = literal.run(g, drop_point, fill, stale)
                if fill == "rescale":
                    worst = max(worst, float(((fast[t] - expect).abs() / expect.abs().clamp_min(1)).max()))
                else:
                    equal &= bool(torch.equal(fast[t], expect))
            lost = state.stats()
            out[f"{algorithm}/{drop_point}/{fill}"] = {
                "equal": equal,
                "rel": worst,
                "lost": sum(lost[p]["packets_lost"] for p in ("worker", "post") if p in lost),
            }
    return out


CLOCK_CASES = [("1.2x", "both", "zero"), ("adaptive p50 last=2 cap=2x", "both", "zero")]
CLOCK_CASES += [("1.2x", "worker", "rescale")]


def clocked() -> dict:
    """The deadline transport per hop: the hook's result against the literal algorithms fed
    the packets a second state's clock found late (fixed and adaptive deadlines), and every
    rank's clock totals (the same on every rank)."""
    W, r = dist.get_world_size(), dist.get_rank()
    k, n, steps = 10, 17, 4
    net = NetworkModel(
        bandwidth_gbps=10,
        latency_us=5,
        jitter="lognormal 1 1",
        straggler_prob=0.2,
        straggler_factor=1.5,
        drop_rate=0.05,
    )
    out = {}
    for algorithm in ALGORITHMS:
        for deadline, drop_point, fill in CLOCK_CASES:
            kw = dict(
                loss_model=f"deadline {deadline}",
                network=net,
                mtu=4 * k,
                algorithm=algorithm,
                drop_point=drop_point,
                fill=fill,
                seed=5,
            )
            state = LossyState(reduction="sum", **kw)
            fast = hook_steps(state, n * k, steps, float(2**r))
            reference = LossyState(reduction="sum", **kw)
            assert reference.hops is not None and reference.clock is not None
            reference.clock.prepare(torch.device("cpu"), 5, W)
            reference.hops.prepare(torch.device("cpu"), 5, r, W)
            reference.hops.bind_clock(reference.clock)
            literal = Literal(reference, algorithm, k, n, W, r)
            stale = torch.zeros(n * k)
            g = torch.full((n * k,), float(2**r))
            worst, equal = 0.0, True
            for t in range(steps):
                reference.clock.tick(n, 4 * n * k, 4 * k)
                expect = literal.run(g, drop_point, fill, stale)
                if fill == "rescale":
                    worst = max(worst, float(((fast[t] - expect).abs() / expect.abs().clamp_min(1)).max()))
                else:
                    equal &= bool(torch.equal(fast[t], expect))
            lost = state.stats()
            out[f"{algorithm}/{deadline}/{drop_point}/{fill}"] = {
                "equal": equal,
                "rel": worst,
                "lost": sum(lost[p]["packets_lost"] for p in ("worker", "post") if p in lost),
                "clock": state.clock.read() if state.clock is not None else None,
            }
    return out


class Full(nn.Module):
    """One parameter whose gradient is the input value and whose forward returns it whole
    (under FSDP: the unsharded parameter, as the all-gather delivered it)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))

    def forward(self, x: float) -> torch.Tensor:
        return self.w * x


FSDP_CASES = [("reduce-scatter", "zero"), ("reduce-scatter", "rescale"), ("all-gather", "zero")]
FSDP_CASES += [("all-gather", "stale")]


def fsdp_oracle() -> dict:
    """FSDP2's lossy reduce-scatter (the reduce phase) and all-gather (the broadcast phase)
    per hop of a ring and a direct exchange, through a real ``fully_shard`` model, against
    the literal algorithms fed the same hop losses: row ``c`` of the shard set is chunk ``c``."""
    from torch.distributed.fsdp import fully_shard

    from lossy_hooks import fsdp

    W, r = dist.get_world_size(), dist.get_rank()
    k, per_row, steps = 10, 3, 4  # 3 packets of 10 elements per row
    n, m = W * per_row, per_row * k
    out = {}
    for algorithm in ("ring", "direct"):
        for collective, fill in FSDP_CASES:
            kw = dict(loss_rate=P, mtu=4 * k, algorithm=algorithm, fill=fill, seed=7)
            model = Full(W * m)
            fully_shard(model)
            if collective == "reduce-scatter":
                state = LossyState(reduction="sum", drop_point="worker", **kw)
                fsdp.register(model, state)
                drop_point = "worker"
            else:
                state = fsdp.gather_state(**kw)
                fsdp.register(model, None, all_gather=state)
                drop_point = "post"
            reference = LossyState(reduction="sum", drop_point=drop_point, **{**kw, "fill": "zero"})
            assert reference.hops is not None
            reference.hops.prepare(torch.device("cpu"), 7, r, W)
            literal = Literal(reference, algorithm, k, n, W, r)
            stale = torch.zeros(n * k)
            worst, equal, first = 0.0, True, None
            for _ in range(steps):
                if collective == "reduce-scatter":
                    model.zero_grad(set_to_none=True)
                    model(float(2**r)).sum().backward()
                    got = model.w.grad.to_local().detach().clone()
                    expect = literal.run(torch.full((n * k,), float(2**r)), "worker", fill, stale)[
                        r * m : (r + 1) * m
                    ]
                    if fill == "rescale":
                        worst = max(worst, float(((got - expect).abs() / expect.abs().clamp_min(1)).max()))
                    else:
                        equal &= bool(torch.equal(got, expect))
                else:  # the shards change each step (as parameters do): rank c's holds 2^c (t + 1)
                    t = state.bucket_calls + 1
                    with torch.no_grad():
                        model.w.to_local().fill_(float(2**r * t))
                        got = model(1.0).detach().clone()
                    model.reshard()  # one all-gather per forward
                    g = torch.zeros(n * k)
                    g[r * m : (r + 1) * m] = float(2**r * t)
                    if first is None:  # the stale copy starts as the whole model's first values
                        first = torch.cat([torch.full((m,), float(2**c)) for c in range(W)])
                        stale.copy_(first)
                    expect = literal.run(g, "post", fill, stale)
                    equal &= bool(torch.equal(got, expect))
            stats = state.stats()
            point = "worker" if collective == "reduce-scatter" else "post"
            out[f"{algorithm}/{collective}/{fill}"] = {
                "equal": equal,
                "rel": worst,
                "calls": state.bucket_calls,
                "lost": stats[point]["packets_lost"],
                "sent": stats[point]["packets_sent"],
                "links": len(stats.get("links", [])),
            }
    return out


def loss0_bitwise() -> dict:
    """Loss 0: every algorithm's gradients bitwise those of DDP without a hook (mean)."""
    torch.manual_seed(0)
    x = torch.randn(8, 33)
    out = {}
    grads = {}
    for algorithm in ("none", *ALGORITHMS):
        torch.manual_seed(1)
        model = DDP(nn.Sequential(nn.Linear(33, 17), nn.Tanh(), nn.Linear(17, 3)))
        if algorithm != "none":
            model.register_comm_hook(
                LossyState(loss_rate=0.0, algorithm=algorithm, drop_point="both"), lossy_allreduce_hook
            )
        for _ in range(3):
            model.zero_grad()
            model(x * (dist.get_rank() + 1)).square().sum().backward()
        grads[algorithm] = [p.grad.clone() for p in model.parameters()]
    for algorithm in ALGORITHMS:
        out[algorithm] = all(torch.equal(a, b) for a, b in zip(grads["none"], grads[algorithm], strict=True))
    return out


def distances() -> dict:
    """Per algorithm, phase and rank: how often each rank's contribution to a chunk arrived
    (reduce, decoded from 2**r sums) and how often each chunk's result reached it
    (broadcast), by chunk; the counts test_placements.py compares with the closed forms."""
    W, r = dist.get_world_size(), dist.get_rank()
    k, n, steps, p = 2, 40, 60, 0.2
    out: dict = {}
    for algorithm in ALGORITHMS:
        chunks = {"ring": W, "direct": W, "tree": 1, "dbtree": 2}[algorithm]
        chunk_of = np.repeat(np.arange(chunks), [len(c) for c in np.array_split(np.arange(n), chunks)])
        for drop_point in ("worker", "post"):
            state = LossyState(
                loss_rate=p,
                mtu=4 * k,
                algorithm=algorithm,
                drop_point=drop_point,
                fill="zero",
                reduction="sum",
                seed=9,
            )
            grads = (
                torch.stack(hook_steps(state, n * k, steps, float(2**r)))[:, ::k].round().long()
            )  # (steps, n)
            if drop_point == "worker":  # arrived[s, j, x]: rank x's contribution to packet j arrived
                arrived = torch.stack([(grads >> x) & 1 for x in range(W)], -1)
                table = [
                    [int(arrived[:, chunk_of == c, x].sum()), int((chunk_of == c).sum()) * steps]
                    for c in range(chunks)
                    for x in range(W)
                ]
                per_packet = arrived.sum(-1).double().flatten()  # contributions delivered per packet
                out[f"{algorithm}/reduce"] = {
                    "table": table,
                    "mean": float(per_packet.mean()),
                    "var": float(per_packet.var()),
                    "samples": per_packet.numel(),
                }
            else:  # rank r received packet j iff it is not 0
                got = (grads != 0).long()
                out[f"{algorithm}/broadcast/{r}"] = [
                    [int(got[:, chunk_of == c].sum()), int((chunk_of == c).sum()) * steps]
                    for c in range(chunks)
                ]
            out[f"{algorithm}/{drop_point}/stats"] = {
                k2: v for k2, v in state.stats().items() if k2 in ("worker", "post", "links")
            }
    return out


def heterogeneous() -> dict:
    """ranks_per_node=2 and one bad link on a ring: the per-link counts of stats()."""
    W, r = dist.get_world_size(), dist.get_rank()
    state = LossyState(
        loss_rate=0.1,
        mtu=8,
        algorithm="ring",
        drop_point="both",
        fill="zero",
        reduction="sum",
        ranks_per_node=2,
        link_loss={(W - 1, 0): 0.5},
        seed=3,
    )
    hook_steps(state, 400, 30, float(2**r))
    return state.stats()


def resume() -> dict:
    """A state saved after 3 steps and loaded into a fresh one continues the same hop losses."""
    r = dist.get_rank()
    kw = dict(
        loss_rate=0.3, mtu=8, algorithm="ring", drop_point="both", fill="rescale", reduction="sum", seed=4
    )
    whole = LossyState(**kw)
    full = hook_steps(whole, 100, 6, float(2**r))
    first = LossyState(**kw)
    hook_steps(first, 100, 3, float(2**r))
    second = LossyState(**kw)
    second.load_state_dict(first.state_dict())
    rest = hook_steps(second, 100, 3, float(2**r))
    return {
        "same": all(torch.equal(a, b) for a, b in zip(full[3:], rest, strict=True)),
        "lost_anything": whole.stats()["worker"]["packets_lost"] > 0,
    }


if __name__ == "__main__":
    scenarios = (oracle, clocked, fsdp_oracle, loss0_bitwise, distances, heterogeneous, resume)
    worker_main({f.__name__: f for f in scenarios})

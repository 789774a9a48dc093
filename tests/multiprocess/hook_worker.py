"""Runs as one rank of a Gloo process group (see launch.py); each scenario returns numbers
that tests/multiprocess/test_hook_ddp.py asserts on. Usage: hook_worker.py OUT.json SCENARIO [...]"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lossy_hooks.core.options as options_module
from lossy_hooks import (
    ExactCount,
    GilbertElliott,
    LossModel,
    LossyState,
    TailDrop,
    Trace,
    lossy_allreduce_hook,
)
from lossy_hooks.study.replicas import resync_replicas

try:  # run as a script (tests/ on sys.path) or imported from the tests package
    from host_sync_guard import forbid_host_sync
    from launch import worker_main
except ImportError:
    from tests.launch import worker_main
    from tests.multiprocess.host_sync_guard import forbid_host_sync


class Probe(nn.Module):
    """Parameters of given sizes whose gradient is exactly the input: loss = sum(w * x)."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(torch.zeros(n)) for n in sizes])

    def forward(self, x: float) -> torch.Tensor:
        return sum((w * x).sum() for w in self.ws)  # type: ignore[return-value]


def probe_step(ddp: DDP, value: float) -> list[torch.Tensor]:
    ddp.zero_grad(set_to_none=True)
    ddp(value).backward()
    return [w.grad.detach().clone() for w in ddp.module.ws]


def rank() -> int:
    return dist.get_rank()


def world() -> int:
    return dist.get_world_size()


def decode(values: torch.Tensor) -> list[list[int]]:
    """Sum of 2**r over arrived ranks -> per-rank arrival bits."""
    v = values.round().long()
    return [((v >> r) & 1).tolist() for r in range(world())]


# ---------------------------------------------------------------- scenarios


def packets_mtu() -> dict:
    """Worker drop, zero fill, sum: rank r contributes 2**r, so each element's value says
    which ranks' copies arrived. mtu=400 B -> k=100 fp32 elements; N=2050 -> 21 packets."""
    p, steps, n, k = 0.3, 150, 2050, 100
    state = LossyState(loss_rate=p, mtu=400, drop_point="worker", fill="zero", reduction="sum", seed=7)
    ddp = DDP(Probe([n]), bucket_cap_mb=25)
    ddp.register_comm_hook(state, lossy_allreduce_hook)
    non_uniform_packets = 0
    arrivals = []  # per step, per packet: value
    boundaries: set[int] = set()  # element i where g[i - 1] != g[i] at some step
    for _ in range(steps):
        g = probe_step(ddp, float(2 ** rank()))[0]
        boundaries |= {int(i) + 1 for i in torch.nonzero(g[1:] != g[:-1]).flatten().tolist()}
        packets = [g[i : i + k] for i in range(0, n, k)]
        non_uniform_packets += sum(int((pk != pk[0]).any()) for pk in packets)
        arrivals.append([float(pk[0]) for pk in packets])
    vals = torch.tensor(arrivals).flatten()
    bits = decode(vals)
    st = state.stats()
    return {
        "hook_packets": [b["packets"] for b in st["buckets"]],
        "hook_sent_per_step": st["worker"]["packets_sent"] / steps,
        "boundaries": sorted(boundaries),
        "non_uniform_packets": non_uniform_packets,
        "lost_per_rank": [len(b) - sum(b) for b in bits],
        "both_lost": int(sum(1 for i in range(len(vals)) if all(b[i] == 0 for b in bits))),
        "total": len(vals),
        "own_stats_lost": st["worker"]["packets_lost"],
        "own_stats_sent": st["worker"]["packets_sent"],
        "steps": st["steps"],
        "p": p,
    }


def packets_tensor() -> dict:
    """packetization='tensor': each parameter's gradient is one packet."""
    sizes, steps = [300, 1200, 50, 7], 200
    state = LossyState(
        loss_rate=0.4,
        mtu=4,
        drop_point="worker",
        fill="zero",
        reduction="sum",
        packetization="tensor",
        seed=3,
    )
    ddp = DDP(Probe(sizes), bucket_cap_mb=25)
    ddp.register_comm_hook(state, lossy_allreduce_hook)
    non_uniform, values = 0, []
    for _ in range(steps):
        grads = probe_step(ddp, float(2 ** rank()))
        non_uniform += sum(int((g != g[0]).any()) for g in grads)
        values.extend(float(g[0]) for g in grads)
    bits = decode(torch.tensor(values))
    return {
        "non_uniform": non_uniform,
        "packets": len(values),
        "lost_per_rank": [len(b) - sum(b) for b in bits],
        "p": 0.4,
        "stats_sent": state.stats()["worker"]["packets_sent"],
    }


def post_masks(sync: str) -> dict:
    """Post drop, zero fill, sum: which packets of the result arrived, per step."""
    n, k, steps = 2000, 100, 100
    state = LossyState(
        loss_rate=0.3, mtu=400, drop_point="post", fill="zero", reduction="sum", post_sync=sync, seed=11
    )
    ddp = DDP(Probe([n]), bucket_cap_mb=25)
    ddp.register_comm_hook(state, lossy_allreduce_hook)
    full = float(sum(2**r for r in range(world())))
    masks, other = [], 0
    for _ in range(steps):
        g = probe_step(ddp, float(2 ** rank()))[0].view(-1, k)
        arrived = (g == full).all(1)
        other += int(((g != full) & (g != 0)).any())
        masks.extend(int(a) for a in arrived.tolist())
    return {"mask": masks, "neither_full_nor_zero": other}


def post_shared() -> dict:
    return post_masks("shared")


def post_independent() -> dict:
    return post_masks("independent")


def rescale_unbiased() -> dict:
    """Average of many lossy results against the lossless mean, worker and post rescale."""
    n, steps = 3000, 300
    out = {}
    for drop_point, p in (("worker", 0.1 if world() >= 4 else 0.05), ("post", 0.1)):
        state = LossyState(loss_rate=p, mtu=200, drop_point=drop_point, fill="rescale", seed=5)
        ddp = DDP(Probe([n]), bucket_cap_mb=25)
        ddp.register_comm_hook(state, lossy_allreduce_hook)
        acc = torch.zeros(n, dtype=torch.float64)
        for _ in range(steps):
            acc += probe_step(ddp, float(rank() + 1))[0].double()
        lossless = (world() + 1) / 2
        out[drop_point] = {
            "mean_ratio": float(acc.mean() / steps / lossless),
            "p": p,
            "loss_rate": state.stats()[drop_point]["loss_rate"],
        }
    return out


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def train_small(
    state: LossyState | None,
    steps: int = 20,
    view: bool = False,
    accumulation: int = 1,
    warmup: bool = False,
    snapshot_at: int | None = None,
    resume: bytes | None = None,
) -> tuple[list[torch.Tensor], dict]:
    torch.manual_seed(0)
    model = SmallNet()
    ddp = DDP(model, bucket_cap_mb=0.01, gradient_as_bucket_view=view)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank())
    saved = pickle.loads(resume) if resume is not None else None
    if saved is not None:
        state = saved["hook"]
    if state is not None:
        ddp.register_comm_hook(state, lossy_allreduce_hook)
    info: dict = {"grads": []}
    if warmup:
        assert state is not None
        with state.passthrough():
            ddp.eval()
            ddp(torch.zeros(2, 3, 16, 16)).sum().backward()
            ddp.train()
        opt.zero_grad(set_to_none=True)
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["gen"])
    for step in range(steps):
        if step == snapshot_at:
            info["snapshot"] = pickle.dumps(
                {"hook": state, "model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state()}
            )
        opt.zero_grad(set_to_none=True)
        for micro in range(accumulation):
            x = torch.randn(4, 3, 16, 16, generator=gen)
            y = torch.randint(0, 10, (4,), generator=gen)
            if micro < accumulation - 1:
                with ddp.no_sync():
                    nn.functional.cross_entropy(ddp(x), y).backward()
            else:
                nn.functional.cross_entropy(ddp(x), y).backward()
        info["grads"].append(torch.cat([p.grad.flatten() for p in ddp.parameters()]))
        opt.step()
    return [p.detach().clone() for p in ddp.parameters()], info


def bitwise_loss0() -> dict:
    """loss 0 -> parameters bitwise equal to DDP without a hook after 20 SGD steps."""
    ref, _ = train_small(None)
    configs = {
        "worker_rescale": dict(drop_point="worker", fill="rescale"),
        "worker_zero": dict(drop_point="worker", fill="zero"),
        "post_rescale": dict(drop_point="post", fill="rescale"),
        "post_stale": dict(drop_point="post", fill="stale"),
        "both_zero_tensor": dict(drop_point="both", fill="zero", packetization="tensor"),
        "independent": dict(drop_point="post", fill="zero", post_sync="independent"),
        "gemodel_p0": dict(loss_model=GilbertElliott(0.0, 0.5), drop_point="worker"),
    }
    out = {}
    for name, kw in configs.items():
        if "loss_model" not in kw:
            kw = dict(kw, loss_rate=0.0)
        params, _ = train_small(LossyState(mtu=1500, **kw))
        out[name] = all(torch.equal(a, b) for a, b in zip(ref, params, strict=True))
    params, _ = train_small(LossyState(loss_rate=0.0), view=True)
    out["bucket_view"] = all(torch.equal(a, b) for a, b in zip(ref, params, strict=True))
    lossy, _ = train_small(LossyState(loss_rate=0.2))
    out["lossy_differs"] = not all(torch.equal(a, b) for a, b in zip(ref, lossy, strict=True))
    return out


def max_rel_diff(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    return max(
        float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in zip(xs, ys, strict=True)
    )


def accumulation_and_views() -> dict:
    """no_sync accumulation fires the hook once per optimizer step; bucket views and the
    appended counts transport give the same results as the defaults."""
    state = LossyState(loss_rate=0.2, mtu=256, seed=1, counts_transport="separate")
    base, _ = train_small(state, steps=6, accumulation=3)
    view_state = LossyState(loss_rate=0.2, mtu=256, seed=1, counts_transport="separate")
    view, _ = train_small(view_state, steps=6, accumulation=3, view=True)
    app_state = LossyState(loss_rate=0.2, mtu=256, seed=1, counts_transport="append")
    app, _ = train_small(app_state, steps=6, accumulation=3)
    regen, _ = train_small(
        LossyState(loss_rate=0.2, mtu=256, seed=1, counts_transport="regenerate"), steps=6, accumulation=3
    )
    auto_state = LossyState(loss_rate=0.2, mtu=256, seed=1)  # default "auto"
    auto, _ = train_small(auto_state, steps=6, accumulation=3)
    cap = options_module.AUTO_REGENERATE_MAX_WORLD
    options_module.AUTO_REGENERATE_MAX_WORLD = dist.get_world_size() - 1  # as if more ranks
    try:
        auto_big_state = LossyState(loss_rate=0.2, mtu=256, seed=1)
        auto_big, _ = train_small(auto_big_state, steps=6, accumulation=3)
    finally:
        options_module.AUTO_REGENERATE_MAX_WORLD = cap
    resumed_auto = pickle.loads(pickle.dumps(auto_big_state))
    ge = dict(loss_model=GilbertElliott(0.05, 0.3), mtu=256, seed=2)
    ge_sep_state = LossyState(counts_transport="separate", **ge)
    ge_sep, _ = train_small(ge_sep_state, steps=6)
    ge_regen_state = LossyState(counts_transport="regenerate", **ge)
    ge_regen, _ = train_small(ge_regen_state, steps=6)
    return {
        "steps": state.steps,
        "view_equal": all(torch.equal(a, b) for a, b in zip(base, view, strict=True)),
        "append_equal": all(torch.equal(a, b) for a, b in zip(base, app, strict=True)),
        "append_max_rel_diff": max_rel_diff(base, app),
        "regenerate_equal": all(torch.equal(a, b) for a, b in zip(base, regen, strict=True)),
        "regenerate_ge_equal": all(torch.equal(a, b) for a, b in zip(ge_sep, ge_regen, strict=True)),
        "regenerate_max_rel_diff": max(max_rel_diff(base, regen), max_rel_diff(ge_sep, ge_regen)),
        "auto_in_use": [auto_state.counts_transport_in_use, auto_big_state.counts_transport_in_use],
        "auto_resumed_in_use": resumed_auto.counts_transport_in_use,
        "auto_equal": [
            all(torch.equal(a, b) for a, b in zip(regen, auto, strict=True)),
            all(torch.equal(a, b) for a, b in zip(base, auto_big, strict=True)),
        ],
        "unrecovered": [
            ge_sep_state.stats()["worker"]["packets_unrecovered"],
            ge_regen_state.stats()["worker"]["packets_unrecovered"],
        ],
        "stats_all": state.stats(all_ranks=True)["worker"],
        "stats_own": state.stats()["worker"],
        "buckets": state.stats()["buckets"],
    }


def pickle_resume() -> dict:
    """Checkpoint (pickled hook state + model + optimizer + data RNG) at step 5, restore into
    a fresh DDP model: the following steps' gradients, hence loss masks, are identical."""
    kw = dict(
        loss_model=GilbertElliott(0.05, 0.3),
        mtu=128,
        drop_point="both",
        fill="zero",
        post_sync="independent",
        seed=9,
    )
    _, first = train_small(LossyState(**kw), steps=12, warmup=True, snapshot_at=5)
    after = first["grads"][5:]
    _, second = train_small(None, steps=7, warmup=True, resume=first["snapshot"])
    same = all(torch.equal(a, b) for a, b in zip(after, second["grads"], strict=True))
    # Without the warm-up the fresh model's first step uses one big bucket: masks differ.
    _, third = train_small(None, steps=7, warmup=False, resume=first["snapshot"])
    differs = not all(torch.equal(a, b) for a, b in zip(after, third["grads"], strict=True))
    # counts regenerated locally: the other ranks' generators are checkpointed too
    kw2 = dict(loss_model=GilbertElliott(0.05, 0.3), mtu=128, fill="rescale", counts_transport="regenerate")
    _, first2 = train_small(LossyState(**kw2), steps=10, warmup=True, snapshot_at=4)
    _, second2 = train_small(None, steps=6, warmup=True, resume=first2["snapshot"])
    same2 = all(torch.equal(a, b) for a, b in zip(first2["grads"][4:], second2["grads"], strict=True))
    return {
        "same_sequence": same,
        "no_warmup_differs": differs,
        "compared": len(second["grads"]),
        "regenerate_same_sequence": same2,
    }


def fidelity() -> dict:
    out = {}
    for p in (0.0, 0.2):
        state = LossyState(loss_rate=p, mtu=256, measure_fidelity=True)
        train_small(state, steps=4)
        out[str(p)] = state.fidelity()
    return out


def layer_accounting() -> dict:
    """Per-parameter packet accounting with tail drop: N = 150 + 100, k = 100 -> 3 packets;
    'tail 1/3' loses the last packet of every bucket, i.e. only the parameter at the end."""
    from lossy_hooks import TailDrop

    state = LossyState(loss_model=TailDrop(1 / 3), mtu=400, drop_point="worker", fill="zero", reduction="sum")
    model = Probe([150, 100])
    ddp = DDP(model, bucket_cap_mb=25)
    ddp.register_comm_hook(state, lossy_allreduce_hook)
    with state.passthrough():
        probe_step(ddp, 1.0)
    for _ in range(10):
        probe_step(ddp, 1.0)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[i] for ids in state.bucket_parameter_ids().values() for i in ids]
    rows = {r["parameter"]: [r["packets_sent"], r["packets_lost"]] for r in state.loss_by_parameter(names)}
    return {
        "order": order,
        "rows": rows,
        "all_ranks": {
            r["parameter"]: r["packets_lost"] for r in state.loss_by_parameter(names, all_ranks=True)
        },
    }


class Scripted(LossModel):
    """A loss model that returns given masks, one per call, cyclically (a test double built
    on the public LossModel interface)."""

    def __init__(self, masks: list[list[int]]) -> None:
        self.masks, self.calls = masks, 0

    def sample(self, num_packets: int, generator: torch.Generator) -> torch.Tensor:
        mask = self.masks[self.calls % len(self.masks)]
        self.calls += 1
        assert len(mask) == num_packets, (len(mask), num_packets)
        return torch.tensor(mask, dtype=torch.bool, device=generator.device)

    def long_run_loss_rate(self) -> float:
        return sum(map(sum, self.masks)) / sum(map(len, self.masks))

    @property
    def spec(self) -> str:
        return f"scripted {self.masks}"

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])


class Distinct(nn.Module):
    """Parameters whose gradients differ: d loss / d ws[i] = (i + 1) * x."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(torch.zeros(n)) for n in sizes])

    def forward(self, x: float) -> torch.Tensor:
        return sum(((i + 1) * w * x).sum() for i, w in enumerate(self.ws))  # type: ignore[return-value]


def stale_rules() -> dict:
    """Post drop, fill='stale', sum: rank r sends (t + 1) * (r + 1) at step t, so the lossless
    result is R_t = (t + 1) W (W + 1) / 2. A zero-fill run with the same seed reveals the
    shared masks; then the stale run, with rank 0 sending inf in one packet at one step."""
    n, k, steps, seed = 500, 100, 14, 21
    kw = dict(loss_rate=0.4, mtu=400, drop_point="post", reduction="sum", seed=seed)
    shadow = DDP(Probe([n]), bucket_cap_mb=25)
    shadow.register_comm_hook(LossyState(fill="zero", **kw), lossy_allreduce_hook)
    masks = []
    for t in range(steps):
        g = probe_step(shadow, float((t + 1) * (rank() + 1)))[0].view(-1, k)
        masks.append([int(v != 0) for v in g[:, 0].tolist()])  # 1 = received
    # inject inf where a packet is received and then lost at a later step
    inject = next(
        (t, j) for t in range(1, steps - 1) for j in range(n // k) if masks[t][j] and not masks[t + 1][j]
    )
    ddp = DDP(Probe([n]), bucket_cap_mb=25)
    ddp.register_comm_hook(LossyState(fill="stale", **kw), lossy_allreduce_hook)
    values, non_uniform = [], 0
    for t in range(steps):
        x = torch.full((n,), float((t + 1) * (rank() + 1)))
        if (t, rank()) == (inject[0], 0):
            x[inject[1] * k : (inject[1] + 1) * k] = float("inf")
        g = probe_step(ddp, x)[0].view(-1, k)  # type: ignore[arg-type]
        non_uniform += int(((g != g[:, :1]) & ~(g.isnan() & g[:, :1].isnan())).any())
        values.append([float(v) for v in g[:, 0].tolist()])
    return {"masks": masks, "values": values, "inject": list(inject), "non_uniform": non_uniform}


def fixed_count_rescale() -> dict:
    """Post drop rescale, mean, 7 packets of 100 elements; rank r sends r + 1."""
    n, k, steps = 700, 100, 200
    out = {}
    for name, model in (("exact", ExactCount(0.3)), ("tail", TailDrop(0.3))):
        state = LossyState(loss_model=model, mtu=400, drop_point="post", fill="rescale", seed=4)
        ddp = DDP(Probe([n]), bucket_cap_mb=25)
        ddp.register_comm_hook(state, lossy_allreduce_hook)
        lossless = (world() + 1) / 2
        ratios, received = [], [0] * (n // k)
        packet_values = set()
        for _ in range(steps):
            g = probe_step(ddp, float(rank() + 1))[0].double()
            ratios.append(float(g.mean() / lossless))
            first = g.view(-1, k)[:, 0]
            for j, v in enumerate(first.tolist()):
                received[j] += int(v != 0)
                if v != 0:
                    packet_values.add(round(v / lossless, 6))
        out[name] = {"ratios": ratios, "received": received, "steps": steps, "values": sorted(packet_values)}
    return out


def per_rank_streams() -> dict:
    """Worker drop, zero fill, sum, rank r sends 2**r: which ranks' copies arrived, for a
    replayed trace (each rank its own offset) and tail drop (the same on every rank)."""
    n, k, steps = 2000, 100, 150
    bits = torch.rand(4999, generator=torch.Generator().manual_seed(0)) < 0.3
    trace_rate = float(bits.float().mean())
    out = {}
    from lossy_hooks import MarkovFourState

    models = (
        ("trace", Trace(bits.int().tolist())),
        ("tail", TailDrop(0.1)),
        ("exact", ExactCount(0.3)),
        ("state", MarkovFourState(0.05, 0.4, 0.2, 0.5, 0.01)),
    )
    for name, model in models:
        state = LossyState(
            loss_model=model, mtu=400, drop_point="worker", fill="zero", reduction="sum", seed=3
        )
        ddp = DDP(Probe([n]), bucket_cap_mb=25)
        ddp.register_comm_hook(state, lossy_allreduce_hook)
        vals = torch.cat([probe_step(ddp, float(2 ** rank()))[0].view(-1, k)[:, 0] for _ in range(steps)])
        arrived = decode(vals)
        out[name] = {
            "lost_per_rank": [len(b) - sum(b) for b in arrived],
            "all_lost": sum(1 for i in range(len(vals)) if all(b[i] == 0 for b in arrived)),
            "identical_masks": all(b == arrived[0] for b in arrived),
            "total": len(vals),
        }
    out["trace_rate"] = trace_rate
    return out


def rebuilt_buckets() -> dict:
    """No warm-up: DDP's first iteration uses one bucket in one order, then rebuilds it with
    the same index and size but the parameters in another order."""
    # per-parameter accounting: 'tail 1/3' on 250 = [150 | 100] elements, 3 packets of 100
    model = Probe([150, 100])
    state = LossyState(loss_model=TailDrop(1 / 3), mtu=400, drop_point="worker", fill="zero", reduction="sum")
    ddp = DDP(model, bucket_cap_mb=25)
    ddp.register_comm_hook(state, lossy_allreduce_hook)
    for _ in range(10):
        probe_step(ddp, 1.0)
    names = {id(p): n for n, p in model.named_parameters()}
    orders = [[names[i] for i in ids] for _, ids in sorted(state.bucket_parameter_ids().items())]
    rows = {r["parameter"]: [r["packets_sent"], r["packets_lost"]] for r in state.loss_by_parameter(names)}
    # stale fill: all three packets received at odd calls, all lost at even ones
    model2 = Distinct([100, 100, 100])
    stale = LossyState(
        loss_model=Scripted([[0, 0, 0], [1, 1, 1]]), mtu=400, drop_point="post", fill="stale", reduction="sum"
    )
    ddp2 = DDP(model2, bucket_cap_mb=25)
    ddp2.register_comm_hook(stale, lossy_allreduce_hook)
    names2 = {id(p): n for n, p in model2.named_parameters()}
    orders2 = [[names2[i] for i in ids] for _, ids in sorted(stale.bucket_parameter_ids().items())]
    grads, snapshot = [], b""
    for t in range(4):
        if t == 3:  # two saved keys of the same index and sizes: the generations (0, 300, 0|1)
            snapshot = pickle.dumps(stale)
        grads.append([float(g[0]) for g in probe_step(ddp2, float(t + 1))])
    orders2 = [[names2[i] for i in ids] for _, ids in sorted(stale.bucket_parameter_ids().items())]
    # resume in a fresh model (new identities) after a passthrough warm-up: the rebuilt bucket
    # takes over the most recent generation's key, hence its stale buffer
    resumed = pickle.loads(snapshot)
    ddp3 = DDP(Distinct([100, 100, 100]), bucket_cap_mb=25)
    ddp3.register_comm_hook(resumed, lossy_allreduce_hook)
    with resumed.passthrough():
        probe_step(ddp3, 0.0)
    after = [float(g[0]) for g in probe_step(ddp3, 4.0)]
    keys = sorted(resumed.bucket_parameter_ids())
    return {
        "orders": orders,
        "rows": rows,
        "stale_orders": orders2,
        "stale_grads": grads,
        "resumed_grads": after,
        "resumed_keys": [list(k) for k in keys],
    }


def resync_momentum() -> dict:
    """Independent post drops make replicas and their momentum differ; resync_replicas with
    the optimizer makes both identical, so one more lossless step keeps them identical."""
    out = {}
    for with_opt in (True, False):
        torch.manual_seed(0)
        model = SmallNet()
        state = LossyState(loss_rate=0.3, mtu=256, drop_point="post", fill="zero", post_sync="independent")
        ddp = DDP(model, bucket_cap_mb=0.01)
        ddp.register_comm_hook(state, lossy_allreduce_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(100 + rank())
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            x, y = torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        resync_replicas(model, opt if with_opt else None)
        synced = [float(p.double().sum()) for p in model.parameters()]
        momentum = [float(opt.state[p]["momentum_buffer"].double().sum()) for p in model.parameters()]
        opt.zero_grad(set_to_none=True)
        x, y = torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        with state.passthrough():
            nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        after = [float(p.double().sum()) for p in model.parameters()]
        out["with_optimizer" if with_opt else "params_only"] = {
            "synced": synced,
            "momentum": momentum,
            "after": after,
        }
    return out


def append_exactness() -> dict:
    """counts_transport='append' in bf16 is refused beyond the exact-count limit (lowered to
    W - 1 here to see it), with a message naming the option."""
    cap = options_module.exact_count_limit
    options_module.exact_count_limit = lambda dtype: world() - 1
    try:
        state = LossyState(
            loss_rate=0.1, mtu=64, drop_point="worker", fill="rescale", counts_transport="append"
        )
        ddp = DDP(Probe([300]).to(torch.bfloat16), bucket_cap_mb=25)
        ddp.register_comm_hook(state, lossy_allreduce_hook)
        try:
            probe_step(ddp, 1.0)
            message = ""
        except Exception as e:  # raised inside the hook, re-raised by backward
            message = str(e)
    finally:
        options_module.exact_count_limit = cap
    return {"message": message}


def no_host_sync() -> dict:
    """Every configuration path of the hook, two steps each under forbid_host_sync (after DDP's
    first iteration and rebuild): the calls that would wait for a GPU that were attempted."""
    from lossy_hooks import MarkovFourState
    from lossy_hooks.core.network import NetworkModel

    jittery = NetworkModel(jitter="lognormal 1 1", straggler_prob=0.2, straggler_factor=2, drop_rate=0.05)

    configs = {
        "worker zero": dict(loss_rate=0.2, fill="zero"),
        "worker rescale separate": dict(loss_rate=0.2, counts_transport="separate"),
        "worker rescale append": dict(loss_rate=0.2, counts_transport="append"),
        "worker rescale regenerate": dict(loss_rate=0.2, counts_transport="regenerate"),
        "post rescale shared": dict(loss_rate=0.2, drop_point="post"),
        "post zero independent": dict(loss_rate=0.2, drop_point="post", fill="zero", post_sync="independent"),
        "post rescale independent": dict(loss_rate=0.2, drop_point="post", post_sync="independent"),
        "post stale": dict(loss_rate=0.2, drop_point="post", fill="stale"),
        "both zero tensor": dict(loss_rate=0.2, drop_point="both", fill="zero", packetization="tensor"),
        "both rescale": dict(loss_rate=0.2, drop_point="both", counts_transport="separate"),
        "gemodel": dict(loss_model=GilbertElliott(0.05, 0.3), drop_point="both"),
        "four-state": dict(loss_model=MarkovFourState(0.03, 0.4, 0.2, 0.5, 0.01), drop_point="both"),
        "exact": dict(loss_model=ExactCount(0.2), drop_point="both"),
        "tail": dict(loss_model=TailDrop(0.2), drop_point="both"),
        "trace": dict(loss_model=Trace([0, 1, 0, 0, 1, 1, 0]), drop_point="both"),
        "fidelity": dict(loss_rate=0.2, measure_fidelity=True),
        "sum": dict(loss_rate=0.2, reduction="sum"),
        "loss 0": dict(loss_rate=0.0),
        "ring both rescale": dict(loss_rate=0.2, algorithm="ring", drop_point="both"),
        "dbtree gemodel": dict(loss_model=GilbertElliott(0.05, 0.3), algorithm="dbtree", drop_point="both"),
        "direct adaptive deadline": dict(
            loss_model="deadline adaptive p90",
            network=jittery,
            algorithm="direct",
            drop_point="both",
            fill="zero",
        ),
        "tree fixed deadline": dict(loss_model="deadline 1.2x", network=jittery, algorithm="tree"),
        "ps adaptive deadline": dict(loss_model="deadline adaptive", network=jittery),
    }
    out = {}
    for name, kw in configs.items():
        state = LossyState(mtu=256, **kw)
        torch.manual_seed(0)
        ddp = DDP(SmallNet(), bucket_cap_mb=0.01)
        ddp.register_comm_hook(state, lossy_allreduce_hook)
        x = torch.randn(4, 3, 16, 16)
        for _ in range(2):  # DDP's first iteration and its bucket rebuild
            ddp(x).sum().backward()
        found: list[str] = []
        for _ in range(2):
            y = ddp(x).sum()
            try:
                with forbid_host_sync() as seen:
                    y.backward()
            except Exception as e:  # DDP cannot go on after a failed backward: next config
                found.append(f"{type(e).__name__}: {e}"[:120])
                break
            finally:
                found += seen
        out[name] = sorted(set(found))
    return out


def rule_values() -> dict:
    """Values the hook delivers, per packet, for rules that averages cannot see. Rank r sends
    2**r in every element (sum reduction), so a packet's value tells which copies arrived."""
    n, k, steps = 2000, 100, 60
    out: dict = {}

    def run(state: LossyState) -> list[float]:
        ddp = DDP(Probe([n]), bucket_cap_mb=25)
        ddp.register_comm_hook(state, lossy_allreduce_hook)
        vals: list[float] = []
        for _ in range(steps):
            vals += [float(v) for v in probe_step(ddp, float(2 ** rank()))[0].view(-1, k)[:, 0].tolist()]
        return vals

    # worker rescale with sum: (W / c_j) * sum of the arrived copies; 0 when none arrived
    state = LossyState(loss_rate=0.4, mtu=400, drop_point="worker", fill="rescale", reduction="sum", seed=8)
    out["worker_rescale_sum"] = {
        "values": run(state),
        "unrecovered": state.stats()["worker"]["packets_unrecovered"],
        "unrecovered_all": state.stats(all_ranks=True)["worker"]["packets_unrecovered"],
    }
    # both, shared post mask, zero fill
    state = LossyState(loss_rate=0.3, mtu=400, drop_point="both", fill="zero", reduction="sum", seed=9)
    out["both_zero_shared"] = {"values": run(state), "post_lost": state.stats()["post"]["packets_lost"]}
    # independent post masks with rescale: received = lossless / (1 - p), per rank
    state = LossyState(
        loss_rate=0.25, mtu=400, drop_point="post", fill="rescale", reduction="sum", post_sync="independent"
    )
    out["post_rescale_independent"] = {"values": run(state), "lost": state.stats()["post"]["packets_lost"]}
    # fidelity: cosine and relative L2 of the delivered gradient against the lossless one
    state = LossyState(
        loss_rate=0.3, mtu=400, drop_point="worker", fill="zero", measure_fidelity=True, seed=2
    )
    ddp = DDP(Probe([n]), bucket_cap_mb=25)
    ddp.register_comm_hook(state, lossy_allreduce_hook)
    delivered = [probe_step(ddp, float(rank() + 1))[0].double().tolist() for _ in range(5)]
    out["fidelity"] = {"delivered": delivered, "records": state.fidelity()}
    return out


def half_buckets() -> dict:
    """fp16 and bf16 buckets through Gloo: worker rescale with sum (rank r sends 2**r), post
    stale fill; the values each packet takes, and the counters."""
    n, k, steps = 1024, 64, 40
    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        res = {}
        for label, kw in {
            "worker_rescale": dict(drop_point="worker", fill="rescale", counts_transport="separate"),
            "post_stale": dict(drop_point="post", fill="stale"),
        }.items():
            state = LossyState(loss_rate=0.3, mtu=128, reduction="sum", seed=6, **kw)  # 64 half elements
            ddp = DDP(Probe([n]).to(dtype), bucket_cap_mb=25)
            ddp.register_comm_hook(state, lossy_allreduce_hook)
            vals: list[float] = []
            for _ in range(steps):
                g = probe_step(ddp, float(2 ** rank()))[0].view(-1, k)
                assert g.dtype == dtype
                vals += [float(v) for v in g[:, 0].float().tolist()]
            res[label] = {"values": vals, "stats": state.stats()}
        out[name] = res
    return out


def combinations() -> dict:
    """Every drop point x post sync x fill x counts transport at W = 3 (other world sizes:
    nothing): rank r sends (t + 1) 2^r at step t (sum), so a delivered packet divided by
    t + 1 says which copies arrived and which factors were applied. Per configuration, the
    value of every packet at every step on this rank."""
    if world() != 3:
        return {}
    n, k, steps = 2000, 100, 40
    out: dict = {}
    for drop in ("worker", "post", "both"):
        for sync in ("shared", "independent"):
            for fill in ("zero", "rescale", "stale"):
                if fill == "stale" and drop != "post":
                    continue
                for counts in ("separate", "append", "regenerate"):
                    state = LossyState(
                        loss_rate=0.3,
                        mtu=4 * k,
                        drop_point=drop,
                        fill=fill,
                        post_sync=sync,
                        counts_transport=counts,
                        reduction="sum",
                        seed=21,
                    )
                    ddp = DDP(Probe([n]), bucket_cap_mb=25)
                    ddp.register_comm_hook(state, lossy_allreduce_hook)
                    vals = [
                        probe_step(ddp, float((t + 1) * 2 ** rank()))[0][::k].tolist() for t in range(steps)
                    ]
                    st = state.stats()
                    out[f"{drop}/{sync}/{fill}/{counts}"] = {
                        "values": vals,
                        "post_lost": st["post"]["packets_lost"] if "post" in st else None,
                        "counts_in_use": state.counts_transport_in_use,
                    }
    return out


SCENARIOS = {
    f.__name__: f
    for f in (
        packets_mtu,
        packets_tensor,
        post_shared,
        post_independent,
        rescale_unbiased,
        bitwise_loss0,
        accumulation_and_views,
        pickle_resume,
        fidelity,
        layer_accounting,
        stale_rules,
        fixed_count_rescale,
        per_rank_streams,
        rebuilt_buckets,
        resync_momentum,
        append_exactness,
        no_host_sync,
        rule_values,
        half_buckets,
        combinations,
    )
}


if __name__ == "__main__":
    worker_main(SCENARIOS)

"""The placement seam (lossy_hooks/core/placement/): where a collective loses packets and
what its loss-free run costs. The parameter server loses one hop each way; the state's drop
sites and ledger, and the clock's prices, come from the placement object. The per-hop
placements' schedules, survival rule, per-link streams and refusals (one process, virtual
ranks); their real-process checks are in tests/multiprocess/test_placements.py."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from lossy_hooks import LossyState
from lossy_hooks.core.netclock import SimClock
from lossy_hooks.core.network import NetworkModel
from lossy_hooks.core.placement import (
    Chunking,
    HopLoss,
    LinkRules,
    LossSite,
    ParameterServer,
    binary_tree_parents,
    parse_link_loss,
    path_products,
    placement_of,
)
from lossy_hooks.core.statistics import binomial_interval, burst_lengths
from lossy_hooks.loss_models import Bernoulli, DeadlineLoss, GilbertElliott
from lossy_hooks.loss_models.deadline import Deadline
from tests.nccl_trees import nccl_get_dtree, nccl_tree_children, nccl_tree_parents

W, N, PACKET = 4, 200, 1500


def test_parameter_server_loses_one_hop_each_way_per_drop_point():
    ps = placement_of("ps")
    assert isinstance(ps, ParameterServer)
    assert ps.sites("worker") == (LossSite("worker", "reduce", 1),)
    assert ps.sites("post") == (LossSite("post", "broadcast", 1),)
    assert [s.name for s in ps.sites("both")] == ["worker", "post"]
    with pytest.raises(ValueError, match="algorithm must be one of 'ps', 'ring', 'tree', 'dbtree', 'direct'"):
        placement_of("mesh")


@pytest.mark.parametrize(
    ("drop_point", "points"), [("worker", ("worker",)), ("post", ("post",)), ("both", ("worker", "post"))]
)
def test_the_state_drops_and_counts_where_its_placement_says(drop_point, points):
    state = LossyState(loss_rate=0.1, drop_point=drop_point)
    assert state.placement.name == "ps"
    assert (state.drops_before, state.drops_after) == ("worker" in points, "post" in points)
    assert state.ledger.points == points


class _Doubled(ParameterServer):
    """The parameter server's sites at twice its price: what the clock charges must follow."""

    name = "doubled"

    def lossfree_seconds(
        self, network: NetworkModel, nbytes: float, world: int, packets: int | None = None
    ) -> float:
        return 2 * super().lossfree_seconds(network, nbytes, world, packets)


def test_the_clock_and_the_deadline_price_a_collective_through_the_placement():
    net = NetworkModel(bandwidth_gbps=10, latency_us=5)
    t0 = 2 * (W - 1) * (5e-6 + N * PACKET / (W * 10e9 / 8))
    totals = []
    for placement in (None, _Doubled()):
        c = SimClock(net, Deadline.parse("1.5x"), placement)
        c.prepare(torch.device("cpu"), 0, W)
        c.tick(N, N * PACKET, PACKET)
        assert c.lossfree_seconds(N * PACKET) == pytest.approx(t0 if placement is None else 2 * t0, rel=1e-12)
        totals.append(c.read()["sim_lossfree_s"])
    assert totals == pytest.approx([t0, 2 * t0], rel=1e-12)
    # the deadline model's closed form takes T_0 from the placement: 1.5 x 2 T_0 leaves the
    # jitter T_0 of slack, not the parameter server's T_0 / 2
    jittery = NetworkModel(bandwidth_gbps=10, latency_us=5, jitter="lognormal 3 1")
    clock = SimClock(jittery, Deadline.parse("1.5x"), _Doubled())
    clock.prepare(torch.device("cpu"), 0, W)
    model = DeadlineLoss("1.5x")
    model.bind(clock, 0)
    keep = model.bucket_keep_fraction(N, N * PACKET)
    t0_j = 2 * jittery.ring_seconds(N * PACKET, W)
    assert keep == pytest.approx(1 - jittery.deadline_loss_probability(1.5 * t0_j, t0_j, W), rel=1e-12)
    half = jittery.ring_seconds(N * PACKET, W)
    assert abs(keep - (1 - jittery.deadline_loss_probability(1.5 * half, half, W))) > 0.01


class _Counting(ParameterServer):
    """The parameter server, counting the collectives it is asked to run."""

    def __init__(self) -> None:
        self.all_reduces: list[int] = []

    def all_reduce(self, tensor: torch.Tensor, group):
        self.all_reduces.append(tensor.numel())
        return super().all_reduce(tensor, group)


def test_the_hook_runs_the_bucket_through_its_placements_collective():
    """The lossy bucket (with its appended counts) goes through ``state.placement.all_reduce``
    once per hook call; what must arrive whole (separate counts, the fidelity reference)
    does not; the parameter server's collective gives DDP's sum."""
    import dataclasses

    from torch.nn.parallel import DistributedDataParallel as DDP

    from lossy_hooks import lossy_allreduce_hook
    from lossy_hooks.core.process_group import single_process_group

    with single_process_group():
        for transport, extra in (("separate", 0), ("append", 1)):
            state = LossyState(loss_rate=0.2, mtu=400, counts_transport=transport, measure_fidelity=True)
            counting = _Counting()
            state.settings = dataclasses.replace(state.settings, placement=counting)
            torch.manual_seed(0)
            model = torch.nn.Linear(50, 4)
            ddp = DDP(model)
            ddp.register_comm_hook(state, lossy_allreduce_hook)
            ddp(torch.ones(2, 50)).sum().backward()
            numel = sum(p.numel() for p in model.parameters())
            packets = state.stats()["worker"]["packets_sent"]
            assert counting.all_reduces == [numel + extra * packets] and state.bucket_calls == 1
            assert len(state.fidelity()) == 1


# ------------------------------------------------------------------ per-hop placements

CPU = torch.device("cpu")


def hop_loss(
    algorithm: str, world: int, model, phases=("reduce", "broadcast"), rules=None, seed=0
) -> HopLoss:
    hops = HopLoss(placement_of(algorithm), model, rules or LinkRules(), phases)
    hops.prepare(CPU, seed, 0, world)
    return hops


def test_the_ring_schedule_is_ncclS_step_chunk_schedule():
    """W = 3: at reduce-scatter step s rank r sends chunk (r - s - 1) mod W to r + 1; at
    all-gather step s chunk (r - s) mod W. Each link carries W - 1 chunks per phase."""
    shapes = placement_of("ring").shapes(3)
    for phase, first_chunk in (
        ("reduce", lambda r, s: (r - s - 1) % 3),
        ("broadcast", lambda r, s: (r - s) % 3),
    ):
        shape = shapes[phase]
        assert shape.links == ((0, 1), (1, 2), (2, 0)) and shape.steps == 2 and shape.depth == 2
        for link, (src, _) in enumerate(shape.links):
            for s in range(2):
                assert shape.carries[link * 2 + s] == first_chunk(src, s), (phase, src, s)


def test_ncclS_binary_tree_shape():
    """The tree drawn in NCCL's trees.cc for 14 ranks: 0 -> 8 -> {4, 12}, 4 -> {2, 6}, ..."""
    parent = binary_tree_parents(14).tolist()
    assert parent == [0, 2, 4, 2, 8, 6, 4, 6, 0, 10, 12, 10, 8, 12]
    second = placement_of("dbtree").trees(8)["reduce"][0][1]
    interior = {int(p) for r, p in enumerate(second) if p != r}
    assert interior and all(x % 2 == 1 for x in interior)  # W even: the first tree's leaves


# NCCL's double tree (ncclGetDtree of NCCL 2.5.6-2.7.8, tests/nccl_trees.py) worked out by
# hand: parents (the root its own) and children of both trees. The second tree is the first
# mirrored (rank W-1-q at position q) at odd W, shifted by one (rank q+1) at even W.
DTREES = {
    3: (
        [0, 2, 0],  # 0 -> 2 -> 1
        [2, 0, 2],  # mirrored: 2 -> 0 -> 1 (the shifted tree's root would be 1)
        [{2}, set(), {1}],
        [{1}, set(), {0}],
    ),
    5: (
        [0, 2, 4, 2, 0],  # 0 -> 4 -> 2 -> {1, 3}
        [4, 2, 0, 2, 4],  # mirrored: 4 -> 0 -> 2 -> {1, 3}
        [{4}, set(), {1, 3}, set(), {2}],
        [{2}, set(), {1, 3}, set(), {0}],
    ),
    6: (
        [0, 2, 4, 2, 0, 4],  # 0 -> 4 -> {2, 5}, 2 -> {1, 3}
        [5, 1, 3, 5, 3, 1],  # shifted: 1 -> 5 -> {0, 3}, 3 -> {2, 4}
        [{4}, set(), {1, 3}, set(), {2, 5}, set()],
        [set(), {5}, set(), {2, 4}, set(), {0, 3}],
    ),
}


@pytest.mark.parametrize("world", sorted(DTREES))
def test_ncclS_double_tree_at_odd_and_even_world_sizes(world):
    """The double tree's two trees at W = 3, 5, 6 against NCCL's ncclGetDtree: by hand
    (DTREES), its literal transcription, and the placement's reduce and broadcast trees."""
    first, second, kids_first, kids_second = DTREES[world]
    assert nccl_tree_parents(world) == [first, second]
    assert nccl_tree_children(world) == [kids_first, kids_second]
    assert [nccl_get_dtree(world, r)[1][0] for r in range(world)].count(-1) == 1  # one root
    trees = placement_of("dbtree").trees(world)
    for phase in ("reduce", "broadcast"):
        parent = trees[phase][0]
        assert parent.tolist() == [first, second], (world, phase)
    assert placement_of("tree").trees(world)["reduce"][0].tolist() == [first]
    for w in range(1, 33):  # and the transcription at every W up to 32
        assert placement_of("dbtree").trees(w)["reduce"][0].tolist() == nccl_tree_parents(w), w


def test_path_products_are_the_product_along_each_path():
    """Pointer doubling against a walk up the tree, on a random forest of depth up to 9."""
    g = torch.Generator().manual_seed(0)
    for world in (1, 2, 5, 10):
        parent = torch.stack([torch.arange(world)] * 3)
        for c in range(3):  # a random tree: each rank's parent among the ranks before it
            order = torch.randperm(world, generator=g)
            for i in range(1, world):
                parent[c, order[i]] = order[int(torch.randint(i, (1,), generator=g))]
        edge = torch.rand((3, world, 4), generator=g) > 0.2
        edge[parent == torch.arange(world)] = True
        depth = 0
        for c in range(3):
            for r in range(world):
                want, x, d = torch.ones(4, dtype=torch.bool), r, 0
                while parent[c, x] != x:
                    want &= edge[c, x]
                    x, d = int(parent[c, x]), d + 1
                depth = max(depth, d)
                got = path_products(edge, parent, max(depth, world))[c, r]
                assert torch.equal(got, want)


def test_chunks_split_as_array_split_and_slots_mark_the_short_chunks():
    c = Chunking.of(17, 5)
    assert c.sizes.tolist() == [4, 4, 3, 3, 3] and c.slots == 4
    assert c.packet_slot.tolist()[:9] == [0, 1, 2, 3, 4, 5, 6, 7, 8] and c.packet_slot[8] == 8
    assert c.packet_slot.tolist()[8:] == [8, 9, 10, 12, 13, 14, 16, 17, 18]


def test_gilbert_elliott_bursts_stay_on_their_link_across_collectives():
    """GE per link (p=5%, r=25%, loss in bad 1): each link's stream of slots, concatenated over
    collectives, has bursts of mean length 1/r; a stream restarted per collective would cut
    them. Burst lengths are geometric: the mean is checked in a 99.9% normal interval."""
    model = GilbertElliott(0.05, 0.25)
    hops = hop_loss("ring", 4, model, phases=("reduce",))
    rows = [hops.draw("reduce", 40, CPU)[:-1].view(4, -1) for _ in range(300)]
    for link in range(4):
        seq = torch.cat([~r[link] for r in rows])
        bursts = burst_lengths(seq).double()
        mean, sd = float(bursts.mean()), 1 / 0.25 * math.sqrt(1 - 0.25)
        assert abs(mean - 4.0) < 3.29 * sd / math.sqrt(len(bursts)), (link, mean, len(bursts))
    # the links are independent streams: their loss sequences differ
    assert not torch.equal(rows[0][0], rows[0][1])


def test_ranks_per_node_and_link_overrides_pick_each_links_model():
    rules = LinkRules(2, parse_link_loss("3->0=50%; 1->2=gemodel 1% 20%"))
    hops = hop_loss("ring", 4, Bernoulli(0.1), phases=("reduce",), rules=rules)
    models = dict(zip(hops.links["reduce"], hops.streams["reduce"].models, strict=True))
    assert models[(0, 1)].is_lossless() and models[(2, 3)].is_lossless()
    assert models[(3, 0)].spec == "random 50%" and models[(1, 2)].spec.startswith("gemodel 1%")
    keep = torch.stack([hops.draw("reduce", 30, CPU)[:-1].view(4, -1) for _ in range(50)])
    assert keep[:, 0].all() and keep[:, 2].all() and not keep[:, 3].all()
    with pytest.raises(ValueError, match="link_loss names 0->2, which algorithm='ring' does not use"):
        hop_loss("ring", 4, Bernoulli(0.1), rules=LinkRules(None, parse_link_loss({(0, 2): 0.1})))
    with pytest.raises(ValueError, match="link_loss names 4->0, but the group has 4 ranks"):
        hop_loss("ring", 4, Bernoulli(0.1), rules=LinkRules(None, parse_link_loss({"4->0": 0.1})))
    with pytest.raises(ValueError, match="a link is written 'src->dst'"):
        parse_link_loss("3-4=5%")
    # a tree's reduce and broadcast links differ: an override needs a link of one lossy phase
    tree = hop_loss("tree", 5, Bernoulli(0.1), rules=LinkRules(None, parse_link_loss({(1, 2): 0.5})))
    assert (
        dict(zip(tree.links["reduce"], tree.streams["reduce"].models, strict=True))[(1, 2)].spec
        == "random 50%"
    )
    with pytest.raises(ValueError, match="link_loss names 2->1, which algorithm='tree' does not use"):
        hop_loss(
            "tree", 5, Bernoulli(0.1), ("reduce",), rules=LinkRules(None, parse_link_loss({(2, 1): 0.5}))
        )


def test_the_two_phases_of_drop_point_both_lose_independently():
    """drop_point="both" on a ring (W = 4, p = 30%): the reduce and broadcast phases have the
    same links, steps and slots, and each loses at p; the same (link, step, slot) is lost in
    both with p^2 (independent streams), in 99.9% binomial intervals (a shared stream: p)."""
    p, world = 0.3, 4
    state = LossyState(loss_rate=p, algorithm="ring", drop_point="both", seed=3)
    hops = state.hops
    assert hops is not None and hops.phases == ("reduce", "broadcast")
    hops.prepare(CPU, 3, 0, world)
    assert hops.links["reduce"] == hops.links["broadcast"]
    lost = {"reduce": [], "broadcast": []}
    for _ in range(100):  # 100 collectives of 40 packets: 4 links x 3 steps x 10 slots each
        for phase in lost:
            lost[phase].append(~hops.draw(phase, 40, CPU)[:-1])
    reduce, broadcast = torch.stack(lost["reduce"]), torch.stack(lost["broadcast"])
    cells = reduce.numel()
    assert cells == 100 * 4 * 3 * 10
    for phase, got, rate in (
        ("reduce", reduce, p),
        ("broadcast", broadcast, p),
        ("both", reduce & broadcast, p * p),
    ):
        lo, hi = binomial_interval(cells, rate)
        assert lo <= int(got.sum()) <= hi, (phase, int(got.sum()) / cells, rate)


def test_path_keep_is_the_product_of_each_paths_link_keep_fractions():
    """An uneven ring (W = 4, each link its own rate): q[c, r] is the product of the keep
    fractions 1 - p of the links on r's path, from r to chunk c's owner c (reduce) and from c
    to r (broadcast); the broadcast rescale factor of each of r's packets is 1 / q[c, r]."""
    world = 4
    rates = {(0, 1): 0.1, (1, 2): 0.2, (2, 3): 0.3, (3, 0): 0.4}
    rules = LinkRules(None, parse_link_loss(rates))
    packets = 10  # chunks of 3, 3, 2, 2 packets

    def along(src: int, dst: int) -> float:  # downstream src -> src+1 -> ... -> dst
        q, x = 1.0, src
        while x != dst:
            q, x = q * (1 - rates[x, (x + 1) % world]), (x + 1) % world
        return q

    want = {
        "reduce": [[along(r, c) for r in range(world)] for c in range(world)],
        "broadcast": [[along(c, r) for r in range(world)] for c in range(world)],
    }
    assert want["broadcast"][0][3] == pytest.approx(0.9 * 0.8 * 0.7)
    chunk_of = torch.cat(
        [torch.full((len(a),), c) for c, a in enumerate(torch.arange(packets).tensor_split(world))]
    )
    for rank in range(world):
        hops = hop_loss("ring", world, Bernoulli(0.05), rules=rules)
        hops.prepare(CPU, 0, rank, world)
        for phase in ("reduce", "broadcast"):
            q = hops.path_keep(phase, packets, CPU)
            assert torch.allclose(q, torch.tensor(want[phase]), rtol=1e-6, atol=0), (phase, q.tolist())
        factor = hops.masks(packets, counts=False, post_rescale=True, device=CPU).post_factor
        assert factor is not None
        expected = [1 / want["broadcast"][int(c)][rank] for c in chunk_of]
        assert factor.tolist() == pytest.approx(expected, rel=1e-6), rank


def test_a_resumed_hop_loss_continues_every_links_stream():
    for model in (Bernoulli(0.3), GilbertElliott(0.1, 0.3)):
        whole = hop_loss("direct", 3, model)
        want = [whole.draw(ph, 11, CPU) for _ in range(4) for ph in ("reduce", "broadcast")]
        first = hop_loss("direct", 3, model)
        got = [first.draw(ph, 11, CPU) for _ in range(2) for ph in ("reduce", "broadcast")]
        second = HopLoss(placement_of("direct"), model, LinkRules(), ("reduce", "broadcast"))
        second.load_state_dict(first.state_dict())
        second.prepare(CPU, 0, 0, 3)
        got += [second.draw(ph, 11, CPU) for _ in range(2) for ph in ("reduce", "broadcast")]
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True)), model


@pytest.mark.parametrize(
    "settings, match",
    [
        (
            dict(algorithm="ring", post_sync="independent"),
            "algorithm='ring' does not take post_sync='independent'",
        ),
        (dict(algorithm="tree", counts_transport="append"), "does not take counts_transport='append'"),
        (dict(algorithm="direct", fec=(4, 1)), "does not take fec"),
        (dict(algorithm="dbtree", retransmit=2), "does not take retransmit=2"),
        (dict(ranks_per_node=2), "ranks_per_node needs a per-hop algorithm"),
        (dict(algorithm="ring", ranks_per_node=0), "ranks_per_node must be a whole number of ranks >= 1"),
        (dict(algorithm="torus"), "algorithm must be one of 'ps', 'ring'"),
    ],
)
def test_per_hop_refusals_name_the_setting_and_the_reason(settings, match):
    with pytest.raises(ValueError, match=match):
        LossyState(loss_rate=0.1, **settings)


def test_per_hop_settings_are_options_in_configs():
    state = LossyState(loss_rate=0.1, algorithm="ring", ranks_per_node=2, link_loss="1->2=5%")
    cfg = state.config()
    assert (
        cfg["algorithm"] == "ring"
        and cfg["ranks_per_node"] == 2
        and cfg["link_loss"] == {"1->2": "random 5%"}
    )
    assert "algorithm" not in LossyState(loss_rate=0.1).config()  # ps: run names unchanged
    assert state.settings.fsdp_refusal() is None  # the placement decides (fsdp_refuses)
    again = pickle.loads(pickle.dumps(state))
    assert again.config() == cfg


@pytest.mark.parametrize("world", [3, 8, 64, 512])
def test_expected_delivered_is_each_algorithms_closed_form(world):
    """From the schedule's paths: the ring's (1-(1-p)^W)/(W p) (0.966 at W = 8, 0.741 at 64,
    0.194 at 512 for p = 1%), the direct exchange's 1 - p (W-1)/W, the ps's 1 - p, the trees'
    mean (1-p)^depth; the broadcast phase the same by symmetry."""
    p = 0.01
    ring = (1 - (1 - p) ** world) / (world * p)
    assert placement_of("ring").expected_delivered(world, p, "reduce") == pytest.approx(ring, rel=1e-12)
    assert placement_of("ring").expected_delivered(world, p, "broadcast") == pytest.approx(ring, rel=1e-12)
    direct = 1 - p * (world - 1) / world
    assert placement_of("direct").expected_delivered(world, p, "reduce") == pytest.approx(direct, rel=1e-12)
    assert placement_of("ps").expected_delivered(world, p, "broadcast") == 1 - p
    parent = binary_tree_parents(world)
    depth = [0] * world
    for r in range(world):
        x = r
        while parent[x] != x:
            x, depth[r] = int(parent[x]), depth[r] + 1
    tree = sum((1 - p) ** d for d in depth) / world
    assert placement_of("tree").expected_delivered(world, p, "reduce") == pytest.approx(tree, rel=1e-12)
    if world in (8, 64, 512):
        assert round(ring, 3) == {8: 0.966, 64: 0.741, 512: 0.194}[world]


def test_the_placement_study_writes_its_rows_and_figure(tmp_path):
    from lossy_hooks.experiments import placement_study

    argv = ["--out", str(tmp_path), "--worlds", "2", "16", "--loss_rates", "0.05", "--packets", "300"]
    assert placement_study.main([*argv, "--trials", "2"]) == 0
    import csv

    rows = list(csv.DictReader(open(tmp_path / "placement_study.csv", encoding="utf-8")))
    assert [(r["algorithm"], r["world"]) for r in rows] == [
        (a, w) for a in ("ps", "ring", "tree", "dbtree", "direct") for w in ("2", "16")
    ]
    assert (tmp_path / "placement_study.png").stat().st_size > 10_000
    for r in rows:
        closed = placement_of(r["algorithm"]).expected_delivered(int(r["world"]), 0.05, "reduce")
        assert float(r["delivered_closed_form"]) == pytest.approx(closed, rel=1e-5)
        if r["algorithm"] == "ps":  # W n trials independent copies
            n = int(r["world"]) * 300 * 2
            lo, hi = binomial_interval(n, 0.95)
            assert lo <= round(float(r["delivered"]) * n) <= hi
    ring16 = next(r for r in rows if r["algorithm"] == "ring" and r["world"] == "16")
    direct16 = next(r for r in rows if r["algorithm"] == "direct" and r["world"] == "16")
    assert float(ring16["rel_l2_zero"]) > float(direct16["rel_l2_zero"])  # the ring loses partial sums
    with pytest.raises(SystemExit) as bad:
        placement_study.main([*argv, "--trials", "0"])
    assert bad.value.code == 2


def test_fsdp_takes_ring_and_direct_and_refuses_trees_and_a_reduce_scatter_broadcast():
    from lossy_hooks import fsdp

    for algorithm in ("ring", "direct"):
        fsdp.check_state(LossyState(loss_rate=0.1, algorithm=algorithm, ranks_per_node=2))
        gather = fsdp.gather_state(loss_rate=0.1, algorithm=algorithm)
        assert gather.post_sync == "shared" and gather.drop_point == "post"
    assert fsdp.gather_state(loss_rate=0.1).post_sync == "independent"  # ps: per receiver
    with pytest.raises(ValueError, match="FSDP reduce-scatter: algorithm='tree' has no sharded form"):
        fsdp.check_state(LossyState(loss_rate=0.1, algorithm="tree"))
    with pytest.raises(ValueError, match="FSDP all-gather: algorithm='dbtree' has no sharded form"):
        fsdp.gather_state(loss_rate=0.1, algorithm="dbtree")
    with pytest.raises(ValueError, match="drop_point must be 'worker', not 'both'"):
        fsdp.check_state(LossyState(loss_rate=0.1, algorithm="ring", drop_point="both"))

"""The placement seam (lossy_hooks/core/placement.py): where a collective loses packets and
what its loss-free run costs. Today's placement is a parameter server with one hop each way;
the state's drop sites and ledger, and the clock's prices, come from the placement object."""

from __future__ import annotations

import pytest
import torch

from lossy_hooks import LossyState
from lossy_hooks.core.netclock import Deadline, NetworkModel, SimClock
from lossy_hooks.core.placement import LossSite, ParameterServer, placement_of
from lossy_hooks.loss_models import DeadlineLoss

W, N, PACKET = 4, 200, 1500


def test_parameter_server_loses_one_hop_each_way_per_drop_point():
    ps = placement_of("ps")
    assert isinstance(ps, ParameterServer)
    assert ps.sites("worker") == (LossSite("worker", "reduce", 1),)
    assert ps.sites("post") == (LossSite("post", "broadcast", 1),)
    assert [s.name for s in ps.sites("both")] == ["worker", "post"]
    with pytest.raises(ValueError, match="placement must be one of \\['ps'\\], got 'ring'"):
        placement_of("ring")


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

    def lossfree_seconds(self, network: NetworkModel, nbytes: float, world: int) -> float:
        return 2 * super().lossfree_seconds(network, nbytes, world)


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

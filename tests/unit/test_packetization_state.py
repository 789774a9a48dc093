"""Packet layouts, and LossyState's argument checking and pickling (one process)."""

from __future__ import annotations

import pickle

import pytest
import torch

from lossy_hooks import GilbertElliott, LossyState, PacketLayout
from lossy_hooks.core.options import LossConfig


def test_mtu_layout_counts_and_bounds():
    layout = PacketLayout.by_mtu(1000, mtu=1500, element_size=4)
    assert layout.packet_numel == 375 and layout.num_packets == 3
    assert layout.packet_bounds() == [(0, 375), (375, 750), (750, 1000)]
    assert layout.packet_sizes().tolist() == [375, 375, 250]
    fp16 = PacketLayout.by_mtu(1000, mtu=1500, element_size=2)
    assert fp16.packet_numel == 750 and fp16.num_packets == 2
    exact = PacketLayout.by_mtu(750, mtu=1500, element_size=4)
    assert exact.num_packets == 2 and exact.packet_sizes().tolist() == [375, 375]
    with pytest.raises(ValueError, match="at least one element"):
        PacketLayout.by_mtu(10, mtu=3, element_size=4)


@pytest.mark.parametrize(
    "layout", [PacketLayout.by_mtu(1000, 1500, 4), PacketLayout.by_tensor([10, 600, 390])]
)
def test_packet_operations_match_elementwise_reference(layout):
    torch.manual_seed(0)
    flat = torch.randn(1000)
    lost = torch.tensor([True, False, True])
    factor = torch.tensor([2.0, 3.0, 0.5])
    source = torch.randn(1000)
    per_elem_lost = torch.cat(
        [torch.full((b - a,), bool(v)) for (a, b), v in zip(layout.packet_bounds(), lost, strict=True)]
    )
    per_elem_factor = torch.cat(
        [torch.full((b - a,), float(v)) for (a, b), v in zip(layout.packet_bounds(), factor, strict=True)]
    )

    zeroed = layout.zero_(flat.clone(), lost)
    assert torch.equal(zeroed, torch.where(per_elem_lost, torch.zeros(()), flat))
    assert torch.equal(layout.scale_(flat.clone(), factor), flat * per_elem_factor)
    assert torch.equal(
        layout.fill_from_(flat.clone(), lost, source), torch.where(per_elem_lost, source, flat)
    )
    assert torch.equal(layout.expand(lost), per_elem_lost)
    half = flat.half()
    assert torch.equal(layout.scale_(half.clone(), factor), half * per_elem_factor.half())


def test_lost_non_finite_values_stay_non_finite():
    """Documented: zeroing multiplies by 0, so a lost inf/nan stays non-finite (as without loss)."""
    layout = PacketLayout.by_mtu(8, mtu=16, element_size=4)
    flat = torch.tensor([1.0, float("inf"), 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    out = layout.zero_(flat.clone(), torch.tensor([True, True]))
    assert out[0] == 0 and out[2:].eq(0).all() and out[1].isnan()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_rate=1.5), "loss_rate must be a probability in \\[0, 1\\]"),
        (dict(loss_rate=-0.1), "loss_rate"),
        (dict(mtu=0), "mtu must be a positive"),
        (dict(mtu=-5), "mtu must be a positive"),
        (dict(mtu=1.5), "mtu must be a positive"),
        (dict(drop_point="uplink"), "drop_point must be one of 'worker', 'post', 'both'"),
        (dict(fill="interpolate"), "fill must be one of 'zero', 'rescale', 'stale'"),
        (dict(fill="stale", drop_point="worker"), "fill='stale' needs drop_point='post'"),
        (dict(fill="stale", drop_point="both"), "fill='stale' needs drop_point='post'"),
        (dict(reduction="max"), "reduction must be one of 'mean', 'sum'"),
        (dict(post_sync="sometimes"), "post_sync must be one of"),
        (dict(packetization="bytes"), "packetization must be one of 'mtu', 'tensor'"),
        (dict(counts_transport="udp"), "counts_transport must be one of"),
        (dict(seed=-1), "seed must be a non-negative integer"),
        (dict(loss_rate=0.1, loss_model="random 5%"), "not both"),
        (dict(loss_model="nonsense 5%"), "unknown loss model"),
        (dict(loss_rate=1.0, drop_point="post", fill="rescale"), "long-run loss rate < 1"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossyState(**kwargs)


def test_valid_configurations_construct():
    LossyState(loss_rate=1.0, drop_point="worker", fill="rescale")  # worker rescale handles c=0
    LossyState(loss_model="gemodel 1% 20%", drop_point="both", fill="zero")
    state = LossyState(loss_rate=0.05, mtu=1500, drop_point="post", fill="stale")
    assert state.config()["loss_model"] == "random 5%"


def test_pickle_round_trip_keeps_settings_and_model_state():
    state = LossyState(loss_model=GilbertElliott(0.1, 0.2), mtu=600, drop_point="both", fill="zero", seed=4)
    state.worker.model.sample(100, torch.Generator().manual_seed(0))
    state.steps = 7
    copy = pickle.loads(pickle.dumps(state))
    assert copy.config() == state.config()
    assert copy.steps == 7
    assert copy.worker.model.state_dict() == state.worker.model.state_dict()
    assert copy.process_group is None
    sd = state.state_dict()
    torch.save(sd, "/dev/null")  # plain containers and tensors
    other = LossyState(loss_model=GilbertElliott(0.1, 0.2), mtu=600, drop_point="both", fill="zero", seed=5)
    with pytest.raises(ValueError, match="settings differ"):
        other.load_state_dict(sd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("world", [2, 3, 4, 6, 7])
def test_scaling_before_the_collective_is_ddps_arithmetic(dtype, world):
    """A received packet (factor 1) leaves the pre-collective pass exactly as DDP's reducer
    leaves it, ``grad * (1/W)`` with a scalar, in every dtype and world size; 1/W is folded
    into the per-packet factor only where that is bitwise the same (fp32, or W a power of
    two), never rounded to the bucket's half dtype (1/3 in bf16 is 0.33398)."""
    from lossy_hooks.core.techniques.fills import _exact_factor
    from lossy_hooks.core.techniques.fills import scale_before_collective as _scale_before_collective

    g = torch.Generator().manual_seed(world)
    grad = (torch.randn(1000, generator=g) * 100).to(dtype)
    layout = PacketLayout.by_mtu(1000, 64, grad.element_size())
    keep = torch.ones(layout.num_packets)
    keep[::3] = 0.0  # lost packets
    buf = grad.clone()
    _scale_before_collective(buf, layout, keep, 1.0 / world)
    ddp = grad * (1.0 / world)
    kept = layout.expand(keep).bool()
    assert torch.equal(buf[kept], ddp[kept])
    assert (buf[~kept] == 0).all()
    assert _exact_factor(1 / world, dtype) == (dtype == torch.float32 or world in (2, 4))
    assert float(torch.tensor(1 / 3, dtype=torch.bfloat16)) * 3 != 1.0  # why it matters


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fidelity_sums_match_fp64_over_chunks_and_tail(dtype):
    from lossy_hooks.core.techniques.fidelity import _FIDELITY_CHUNK
    from lossy_hooks.core.techniques.fidelity import fidelity_sums as _fidelity_sums

    g = torch.Generator().manual_seed(0)
    n = 3 * _FIDELITY_CHUNK + 1234  # three whole chunks and a tail
    ref = torch.randn(n, generator=g).to(dtype)
    x = (ref.float() + 0.05 * torch.randn(n, generator=g)).to(dtype)
    x[:100] = 0  # a few lost packets
    xd, rd = x.double(), ref.double()
    want = torch.stack((xd.dot(rd), xd.dot(xd), rd.dot(rd), (xd - rd).square().sum()))
    got = _fidelity_sums(x, ref)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    same = _fidelity_sums(ref, ref)
    assert same[3] == 0 and same[0] == same[1] == same[2]  # identical inputs: cos exactly 1


def test_a_packet_is_finite_only_if_all_its_elements_are():
    layout = PacketLayout.by_mtu(10, 12, 4)  # 3 elements per packet: 3 full packets and a tail of 1
    x = torch.arange(10.0)
    x[4] = float("inf")  # one element of packet 1
    x[9] = float("nan")  # the tail
    assert layout.finite_packets(x).tolist() == [True, False, True, False]
    by_tensor = PacketLayout.by_tensor([2, 5, 3])
    assert by_tensor.finite_packets(x).tolist() == [True, False, False]


def test_fill_from_selects_whole_packets_and_never_touches_received_ones():
    layout = PacketLayout.by_mtu(7, 12, 4)  # packets [0,3) [3,6) [6,7)
    out = torch.tensor([1.0, 2, 3, 4, 5, 6, 7])
    stale = torch.tensor([float("inf"), float("nan"), 0, -1, -2, -3, float("inf")])
    lost = torch.tensor([False, True, False])
    layout.fill_from_(out, lost, stale)
    assert out.tolist() == [1.0, 2, 3, -1, -2, -3, 7]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_per_packet_factor_is_applied_in_fp32_with_one_rounding(dtype):
    """The one precision rule of every factor (W/c_j, 1/q): a half-precision buffer gets
    round(x * f) with f in fp32, never x * round(f) (bf16 1/0.9 is 0.16% low); zeroing
    stays exact; fp32 buffers are multiplied in fp32 as before."""
    layout = PacketLayout.by_mtu(1000, 64, 2)  # 32 elements a packet, a tail of 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, generator=g).to(dtype)
    factor = torch.full((layout.num_packets,), 1 / 0.9)
    factor[1::2] = 3 / 2
    want = (x.float() * layout.expand(factor)).to(dtype)
    assert torch.equal(layout.scale_(x.clone(), factor), want)
    rounded = x * layout.expand(factor.to(dtype))
    assert not torch.equal(rounded, want)  # the rule matters
    lost = torch.zeros(layout.num_packets, dtype=torch.bool)
    lost[::4] = True
    zeroed = layout.zero_(x.clone(), lost)
    assert torch.equal(zeroed, torch.where(layout.expand(lost), 0.0, x.float()).to(dtype))
    x32 = x.float()
    assert torch.equal(layout.scale_(x32.clone(), factor), x32 * layout.expand(factor))


def test_the_fill_rules_against_their_closed_forms():
    """arrival_factor = W/c (0 and counted where c = 0); post_keep = 0 | 1/q | 1 (none for
    stale); regenerated counts of shard rows = own arrivals + each peer's replayed rows with
    the peer's own row received (the literal per-row sum)."""
    from lossy_hooks.core.techniques import FILLS
    from lossy_hooks.core.techniques.fills import arrival_factor, regenerated_counts

    def post_keep(lost, fill, factor):
        return FILLS[fill](LossConfig(fill=fill, drop_point="post")).post_keep(lost, factor)

    unrecovered = torch.zeros((), dtype=torch.int64)
    f = arrival_factor(torch.tensor([0, 1, 2, 3]), 3, unrecovered)
    assert f.tolist() == [0.0, 3.0, 1.5, 1.0] and int(unrecovered) == 1
    lost = torch.tensor([True, False, False])
    assert post_keep(lost, "rescale", 1.25).tolist() == [0.0, 1.25, 1.25]
    assert post_keep(lost, "zero", 1.25).tolist() == [0.0, 1.0, 1.0]
    assert post_keep(lost, "stale", 1.25) is None and post_keep(None, "zero", 1.0) is None
    world, n = 3, 5
    g = torch.Generator().manual_seed(2)
    own = torch.rand(world, n, generator=g) < 0.5
    own[0] = False  # this is rank 0: its own row is local
    peer_rows = {r: torch.rand(world - 1, n, generator=g) < 0.5 for r in (1, 2)}
    peers = [(r, lambda m, r=r: peer_rows[r].reshape(m)) for r in (1, 2)]
    got = regenerated_counts(own, peers, shard_rows=True)
    want = (~own).int()
    for r, rows in peer_rows.items():
        full = [
            rows[i if i < r else i - 1] if i != r else torch.zeros(n, dtype=torch.bool) for i in range(world)
        ]
        want += ~torch.stack(full)
    assert torch.equal(got, want)


def test_the_states_typed_settings_are_exactly_lossconfigs_fields():
    """LossyState reads each setting through a typed property of SettingsView (no attributes
    made at run time): one per field of LossConfig, plus drops_before / drops_after, each
    returning the one copy in state.settings and read-only."""
    import dataclasses

    from lossy_hooks.core.options import LossConfig
    from lossy_hooks.core.settings_view import SettingsView

    views = {n for n, v in vars(SettingsView).items() if isinstance(v, property)}
    assert views == {f.name for f in dataclasses.fields(LossConfig)} | {"drops_before", "drops_after"}
    state = LossyState(loss_rate=0.1, mtu=600, fill="zero", drop_point="both")
    for name in views:
        assert getattr(state, name) is getattr(state.settings, name)
    with pytest.raises(AttributeError):
        state.mtu = 1500

"""FEC, retransmission, protection and the Hadamard encoding on their own (no process group),
against closed forms: exact outcomes on hand-made masks, loss rates within 99.9% binomial
intervals, the transform against the dense Sylvester matrix."""

from __future__ import annotations

import math

import pytest
import torch

from lossy_hooks import LossyState
from lossy_hooks.core.statistics import binomial_interval
from lossy_hooks.core.techniques.hadamard import (
    block_edges,
    block_groups,
    decode_,
    encode,
    fwht,
    padded_numel,
)
from lossy_hooks.core.techniques.protection import COUNTERS, Protection


def scripted(*masks: list[int]):
    """A draw function returning the given masks in turn (checking the requested lengths)."""
    it = iter(masks)

    def draw(count: int) -> torch.Tensor:
        m = torch.tensor(next(it), dtype=torch.bool)
        assert m.numel() == count
        return m

    return draw


def bernoulli(p: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return lambda count: torch.rand(count, generator=g) < p


def counters(c: torch.Tensor) -> dict[str, int]:
    return dict(zip(COUNTERS, c.tolist(), strict=True))


def test_fec_recovers_groups_with_at_most_r_losses_in_wire_order():
    # n = 5 data packets, (g, r) = (2, 1): wire = d0 d1 p | d2 d3 p | d4 p  (8 packets)
    fec = Protection(fec=(2, 1))
    assert fec.parity_packets(5) == 3
    wire = [1, 0, 0, 1, 1, 0, 1, 1]  # group 0: 1 loss -> rebuilt; group 1: 2 > 1 -> d2, d3 lost; last: 2
    lost, c = fec.resolve(5, scripted(wire), None, torch.device("cpu"))
    assert lost.tolist() == [False, False, True, True, True]
    assert counters(c) == {
        "extra_packets": 3,
        "recovered_fec": 1,
        "recovered_retransmit": 0,
        "recovered_protect": 0,
        "protected_packets": 0,
    }


def test_protected_packets_are_never_resent_and_retransmission_tries_k_times():
    both = Protection(retransmit=2)
    first, retry1, retry2 = [1, 1, 1, 0], [1, 0, 1, 1], [0, 1, 1, 1]
    protected = torch.tensor([False, False, True, False])
    lost, c = both.resolve(4, scripted(first, retry1, retry2), protected, torch.device("cpu"))
    # packet 2: protected (sent reliably, never resent); 0: lost, lost, arrives; 1: arrives at try 1
    assert lost.tolist() == [False, False, False, False]
    assert counters(c) == {
        "extra_packets": 2 + 1,  # packets 0 and 1 resent on try 1, packet 0 on try 2
        "recovered_fec": 0,
        "recovered_retransmit": 2,
        "recovered_protect": 1,
        "protected_packets": 1,
    }
    # every packet protected: nothing lost, nothing resent, however lossy the draws
    everything = torch.ones(4, dtype=torch.bool)
    lost, c = both.resolve(4, scripted([1, 1, 1, 1], [1] * 4, [1] * 4), everything, torch.device("cpu"))
    assert not lost.any() and counters(c)["extra_packets"] == 0 and counters(c)["recovered_retransmit"] == 0


def test_retransmission_loss_rate_and_resent_packets_match_bernoulli():
    p, k, n = 0.3, 2, 200_000
    lost, c = Protection(retransmit=k).resolve(n, bernoulli(p), None, torch.device("cpu"))
    lo, hi = binomial_interval(n, p ** (k + 1))
    assert lo <= int(lost.sum()) <= hi
    # resent packets: sum of independent X_j in {0, 1, 2}, P(X >= 1) = p, P(X = 2) = p^2
    mean, var = n * (p + p**2), n * (p + 3 * p**2 - (p + p**2) ** 2)
    assert abs(counters(c)["extra_packets"] - mean) < 3.3 * math.sqrt(var)
    assert Protection(retransmit=k).bernoulli_loss(p) == pytest.approx(p ** (k + 1))


def test_fec_group_failure_rate_matches_the_binomial_tail():
    """Groups are independent: the count of failed full groups is binomial, with failure
    probability P[Bin(g + r, p) > r]; the closed form per data packet follows."""
    p, g, r, groups = 0.1, 8, 1, 20_000
    fec = Protection(fec=(g, r))
    lost, c = fec.resolve(g * groups, bernoulli(p, 1), None, torch.device("cpu"))
    failed = int(lost.view(groups, g).any(1).sum())
    q = sum(math.comb(g + r, i) * p**i * (1 - p) ** (g + r - i) for i in range(r + 1, g + r + 1))
    lo, hi = binomial_interval(groups, q)
    assert lo <= failed <= hi
    assert counters(c)["extra_packets"] == groups * r
    # per data packet: E[lost] = g * bernoulli_loss(p) per group
    expected = g * groups * fec.bernoulli_loss(p)
    assert abs(int(lost.sum()) - expected) < 0.1 * expected
    keep = fec.bernoulli_keep(p, 10)  # 8 + a last group of 2
    assert keep[0] == pytest.approx(1 - fec.bernoulli_loss(p))
    assert keep[-1] == pytest.approx(1 - fec.bernoulli_loss(p, 2)) and keep[-1] != keep[0]


def test_bad_protection_options_are_refused_by_name():
    for kwargs, msg in (
        (dict(retransmit=-1), "retransmit must be a whole number"),
        (dict(fec=(0, 1)), "fec must be \\(g, r\\)"),
        (dict(fec=(8, 0)), "fec must be \\(g, r\\)"),
        (dict(encoding="rotate"), "encoding must be one of"),
        (dict(hadamard_block=1000), "hadamard_block must be a power of two"),
        (dict(wire_dtype="fp8"), "wire_dtype must be one of"),
        (dict(error_feedback=True, drop_point="post", fill="zero"), "error_feedback .* needs drop_point"),
        (dict(error_feedback=True, fill="rescale"), "error_feedback needs fill='zero'"),
        (dict(encoding="hadamard", packetization="tensor"), "needs packetization='mtu'"),
        (dict(encoding="hadamard", drop_point="post", fill="stale"), "cannot use fill='stale'"),
        (dict(loss_model="gemodel 1% 20%", drop_point="post", fec=(8, 1)), "needs loss_rate / a Bernoulli"),
        (dict(protect="("), "protect: '\\(' is not a regular expression"),
    ):
        with pytest.raises(ValueError, match=msg):
            LossyState(**kwargs)


def sylvester(b: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_fwht_is_the_orthonormal_sylvester_transform_and_its_own_inverse():
    for b in (2, 64, 256, 8192):  # one stage, one full stage, 64 x 4, 64 x 64 x 2
        x = torch.randn(3, b)
        y = fwht(x)
        dense = (x.double() @ sylvester(b) / math.sqrt(b)).float()
        assert torch.allclose(y, dense, atol=1e-5), b
        assert torch.allclose(fwht(y), x, atol=1e-5), b
    # whole blocks, then the rest in blocks of its set bits, rounded up to multiples of 1024
    tail = [(2**17, 1), (2**15, 1), (2**14, 1), (2**13, 1), (2**10, 1)]  # 189,280 -> 189,440
    assert block_groups(2**18 + 189_280, 2**18) == [(2**18, 1), *tail]
    assert block_groups(10, 4096) == [(16, 1)] and block_groups(1, 8) == [(1, 1)]
    assert block_groups(20, 8) == [(8, 2), (4, 1)]
    assert padded_numel(5000, 4096) == 4096 + 1024 and padded_numel(8192, 4096) == 8192
    assert padded_numel(300_000, 2**18) == 2**18 + 2**15 + 2**12 + 2**10  # 37,856 -> 37,888
    assert block_edges(5000, 4096) == (0, 4096, 5120) and block_edges(9000, 4096) == (0, 4096, 8192, 9216)
    for n in (1, 1000, 1025, 140_000, 6_553_600 + 12_345):
        assert 0 <= padded_numel(n, 2**18) - n < 1024, n  # padding below one granule per bucket


def test_encode_decode_round_trip_and_a_lost_packet_spreads_over_its_block():
    n, b = 10_000, 1024
    x = torch.randn(n)
    y, signs = encode(x, b, torch.Generator().manual_seed(0))
    assert y.numel() == 10 * b  # padded to whole blocks
    out = torch.empty(n)
    decode_(out, y.clone(), signs, b)
    bound = 4 * math.log2(b) * 2**-24
    assert (out - x).norm() / x.norm() < bound
    lost = y.clone()
    lost[b : b + 375] = 0  # one packet of 375 coefficients lost in block 1
    decode_(out, lost, signs, b)
    err = out - x
    assert err[:b].abs().max() < 1e-5 and err[2 * b :].abs().max() < 1e-5  # other blocks untouched
    assert (err[b : 2 * b] != 0).float().mean() > 0.99  # spread over the whole block
    assert err[b : 2 * b].abs().max() <= y[b : b + 375].abs().sum() / math.sqrt(b) + 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "n, block, tails",
    [
        (2**18 + 1000, 2**18, [1024]),  # 3 stages for the blocks, 2 for the tail: one copy of it
        (4096 + 10, 4096, [16]),  # 2 and 1
        (3 * 4096 + 3000, 4096, [2048, 1024]),  # 2, 2 and 2
        (2**18 + 5000, 2**18, [4096, 1024]),  # 3, 2 and 2
        (2**18 + 2**13 + 3000, 2**18, [8192, 2048, 1024]),  # 3, 3 (64 x 64 x 2), 2, 2
    ],
)
def test_round_trip_with_tail_blocks_of_either_stage_parity(n, block, tails, dtype):
    """A bucket of whole blocks and smaller tail blocks, whose transforms have as many stages
    as the blocks' or one fewer: decoded to round-off, and a lost coefficient of one tail
    block spreads over that block only."""
    x = torch.randn(n, dtype=torch.float64).to(dtype)
    y, words = encode(x, block, torch.Generator().manual_seed(1))
    full = n // block * block
    assert block_groups(n, block) == [(block, n // block)] + [(t, 1) for t in tails]
    assert y.numel() == padded_numel(n, block) == full + sum(tails) and y.dtype == dtype
    out = torch.empty_like(x)
    decode_(out, y.clone(), words, block)
    eps = torch.finfo(dtype).eps
    assert float((out - x).norm() / x.norm()) < 4 * math.log2(block) * eps
    edges = block_edges(n, block)
    for lo, hi in zip(edges[-len(tails) - 1 : -1], edges[-len(tails) :], strict=True):
        lost = y.clone()
        lost[lo] = 0  # a lost coefficient of this tail block
        decode_(out, lost, words, block)
        err = (out - x).abs()
        inside = err[lo : min(hi, n)]
        assert float(err[:lo].max()) < 1e3 * eps and float(inside.min()) > 0, (lo, hi)
        if hi < n:
            assert float(err[hi:].max()) < 1e3 * eps


def test_protect_predicate_keeps_the_chosen_gradients_at_total_loss():
    """protect as a predicate (name, parameter): with every packet lost, the protected
    parameters' gradients still arrive exactly, the others are zero; without names, a clear
    error."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lossy_hooks import lossy_allreduce_hook
    from lossy_hooks.core.process_group import single_process_group

    with single_process_group():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(300, 20), torch.nn.Linear(20, 2))
        ddp = DDP(model)
        state = LossyState(loss_rate=1.0, fill="zero", mtu=400, protect=lambda name, p: p.ndim == 1)
        state.name_parameters(model)
        ddp.register_comm_hook(state, lossy_allreduce_hook)
        ddp(torch.ones(3, 300)).sum().backward()
        biases = [model[0].bias.grad, model[1].bias.grad]
        assert all(g.abs().sum() > 0 for g in biases)
        assert torch.equal(biases[1], torch.full((2,), 3.0))  # d(sum)/d(bias) = batch size
        # the weight packets that carry no bias element are lost (zero)
        assert model[0].weight.grad[:5].abs().sum() == 0
        st = state.stats()["worker"]
        assert st["recovered_protect"] == st["protected_packets"] > 0
        unnamed = LossyState(loss_rate=0.5, protect="bias")
        other = DDP(torch.nn.Linear(4, 2))
        other.register_comm_hook(unnamed, lossy_allreduce_hook)
        with pytest.raises(ValueError, match=r"call state\.name_parameters"):
            other(torch.ones(1, 4)).sum().backward()


def keep_biases(name: str, param: torch.Tensor) -> bool:  # module level: picklable by reference
    return name.endswith("bias")


def one_process_steps(
    state: LossyState, model: torch.nn.Module, steps: int, seed: int = 0
) -> list[torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lossy_hooks import lossy_allreduce_hook

    ddp = DDP(model)
    state.name_parameters(model)
    ddp.register_comm_hook(state, lossy_allreduce_hook)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ddp.zero_grad(set_to_none=True)
        ddp(torch.randn(4, model.in_features, generator=g)).sum().backward()
        out.append(torch.cat([p.grad.flatten().clone() for p in model.parameters()]))
    return out


def test_checkpoints_keep_rotation_options_and_predicates():
    """A resumed Hadamard run continues the same signs; a checkpoint with options does not
    load into a state without them; a pickled predicate stays a predicate."""
    import pickle

    from lossy_hooks.core.process_group import single_process_group

    with single_process_group():
        kw = dict(loss_rate=0.3, encoding="hadamard", hadamard_block=1024, seed=3)
        torch.manual_seed(0)
        model = torch.nn.Linear(300, 20)
        state = LossyState(**kw)
        one_process_steps(state, model, 3)
        saved = state.state_dict()
        ahead = one_process_steps(state, model, 2, seed=1)
        resumed = LossyState(**kw)
        resumed.load_state_dict(saved)
        again = one_process_steps(resumed, model, 2, seed=1)
        assert all(torch.equal(a, b) for a, b in zip(ahead, again, strict=True))
        with pytest.raises(ValueError, match="settings differ"):
            LossyState(loss_rate=0.3, seed=3).load_state_dict(saved)
        with pytest.raises(ValueError, match="settings differ"):
            LossyState(loss_rate=0.3, seed=3, encoding="hadamard").load_state_dict(
                LossyState(loss_rate=0.3, seed=3).state_dict() | {"config": {"loss_model": "random 30%"}}
            )
        copy = pickle.loads(pickle.dumps(LossyState(loss_rate=0.1, protect=keep_biases)))
        assert copy.protect is keep_biases


def test_checkpoints_of_another_hadamard_default_or_layout():
    """The block size is a setting only with the encoding: a checkpoint that names another
    block (the old default, 4096) loads into a state without Hadamard; with Hadamard the blocks
    must agree, and a Hadamard checkpoint of state version 3 (whole-block padding) is refused
    with the reason."""
    plain = LossyState(loss_rate=0.1).state_dict()
    LossyState(loss_rate=0.1).load_state_dict(plain | {"config": plain["config"] | {"hadamard_block": 4096}})
    LossyState(loss_rate=0.1).load_state_dict(plain | {"version": 3})  # a version-3 run without it
    old = LossyState(loss_rate=0.1, encoding="hadamard", hadamard_block=4096).state_dict()
    with pytest.raises(ValueError, match="settings differ"):
        LossyState(loss_rate=0.1, encoding="hadamard").load_state_dict(old)
    with pytest.raises(ValueError, match="before version 4, which padded the last block"):
        LossyState(loss_rate=0.1, encoding="hadamard", hadamard_block=4096).load_state_dict(
            old | {"version": 3}
        )


def test_rescale_is_applied_before_a_narrow_wire_cast():
    """bf16 wire, post drop of exactly 10% with rescale: received elements carry x / 0.9
    rounded once to bf16, so their mean ratio to x is 1/0.9 without the 0.16% bias of a
    bf16-rounded factor."""
    from lossy_hooks.core.process_group import single_process_group

    with single_process_group():
        torch.manual_seed(0)
        model = torch.nn.Linear(1000, 100)
        state = LossyState(
            loss_model="exact 10%", drop_point="post", fill="rescale", wire_dtype="bf16", mtu=400
        )
        (grad,) = one_process_steps(state, model, 1)
        torch.manual_seed(0)
        ref_model = torch.nn.Linear(1000, 100)
        ref_model(torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))).sum().backward()
        ref = torch.cat([p.grad.flatten() for p in ref_model.parameters()])
        received = (grad != 0) & (ref.abs() > 1e-3)
        ratio = (grad[received] / ref[received]).mean()
        assert abs(float(ratio) * 0.9 - 1) < 3e-4


def test_error_feedback_keeps_only_finite_lost_packets():
    from lossy_hooks.core.process_group import single_process_group

    with single_process_group():
        model = torch.nn.Linear(300, 2, bias=False)  # 600 elements: 6 packets of 100
        state = LossyState(loss_rate=1.0, fill="zero", error_feedback=True, mtu=400)
        x = torch.ones(1, 300)
        x[0, 0] = float("inf")  # the first weight row's first element: packet 0 overflows
        from torch.nn.parallel import DistributedDataParallel as DDP

        from lossy_hooks import lossy_allreduce_hook

        ddp = DDP(model)
        ddp.register_comm_hook(state, lossy_allreduce_hook)
        ddp(x).sum().backward()
        (record,) = state.buckets.records.values()
        residual = record.residual
        assert torch.isfinite(residual).all()
        assert residual[:100].abs().sum() == 0 and torch.equal(residual[100:300], torch.ones(200))

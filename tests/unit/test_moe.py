"""The MoE layer of the MoE GPT (lossy_hooks/study/workloads/moe.py), one process: routing and
gates against a per-token reference, the capacity rule on hand cases (first choices before
second choices, then by position), the load-balancing loss against its formula, the layer's
output and gradients against a per-token loop over the experts, and the moe-* models.
The expert-parallel layer: tests/multiprocess/test_group.py (moe_worker.py's scenarios)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from lossy_hooks.study.workloads.gpt import GPT_CONFIGS, auxiliary_loss, build_gpt
from lossy_hooks.study.workloads.models import build_model, build_optimizer
from lossy_hooks.study.workloads.moe import MoEConfig, MoELayer, expert_capacity, route


def reference_route(logits: torch.Tensor, k: int, factor: float) -> list[list[tuple[int, float, bool]]]:
    """Per token, per choice j: (expert, gate, kept), token by token in priority order
    (every first choice, by position, then every second choice)."""
    n, e = logits.shape
    cap = math.ceil(factor * k * n / e)
    taken = [0] * e
    out: list[list[tuple[int, float, bool]]] = [[] for _ in range(n)]
    for j in range(k):
        for i in range(n):
            p = torch.softmax(logits[i].double(), 0)
            order = sorted(range(e), key=lambda c: -float(p[c]))[:k]
            top = [float(p[c]) for c in order]
            gate = top[j] if k == 1 else top[j] / sum(top)
            kept = taken[order[j]] < cap
            taken[order[j]] += kept
            out[i].append((order[j], gate, kept))
    return out


def reference_layer(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The layer as a loop over tokens and their choices, each kept slot through its expert."""
    tokens = x.reshape(-1, x.shape[-1])
    logits = layer.router(tokens)
    probs = logits.softmax(-1)
    routes = reference_route(logits.detach(), layer.cfg.top_k, layer.cfg.capacity_factor)
    rows = []
    for i, choices in enumerate(routes):
        y = torch.zeros_like(tokens[i])
        picked = probs[i, [c for c, _, _ in choices]]
        gates = picked if layer.cfg.top_k == 1 else picked / picked.sum()
        for j, (e, _, kept) in enumerate(choices):
            if kept:
                h = F.gelu(tokens[i] @ layer.w_fc[e] + layer.b_fc[e])
                y = y + gates[j] * (h @ layer.w_proj[e] + layer.b_proj[e])
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("k", [1, 2])
def test_routing_picks_and_gates_match_the_per_token_reference(k):
    torch.manual_seed(k)
    logits = torch.randn(37, 5, dtype=torch.float64)
    r = route(logits, k, capacity_factor=0.9)
    want = reference_route(logits, k, 0.9)
    n = logits.shape[0]
    for s in range(k * n):
        j, i = divmod(s, n)
        e, gate, kept = want[i][j]
        assert (int(r.token[s]), int(r.expert[s]), bool(r.keep[s])) == (i, e, kept)
        assert float(r.gate[s]) == pytest.approx(gate if kept else 0.0, abs=1e-12)
    assert r.capacity == math.ceil(0.9 * k * n / 5)
    assert not r.keep.all()  # the capacity bites in this case


def test_capacity_keeps_first_choices_then_positions_top1():
    """4 tokens, 2 experts, k=1, C=0.5: c = ceil(0.5*1*4/2) = 1. Tokens 0, 1, 2 choose
    expert 0 and token 3 expert 1: expert 0 keeps token 0 only (the first by position)."""
    logits = torch.tensor([[2.0, 0.0], [3.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    r = route(logits, 1, 0.5)
    assert r.capacity == expert_capacity(4, 2, 1, 0.5) == 1
    assert r.expert.tolist() == [0, 0, 0, 1]
    assert r.keep.tolist() == [True, False, False, True]
    assert r.gate[1] == r.gate[2] == 0


def test_capacity_second_choices_yield_to_first_choices_top2():
    """3 tokens, 3 experts, k=2, C=0.5: c = ceil(0.5*2*3/3) = 1 slot per expert. First
    choices 0, 1, 0 and second choices 1, 0, 2: slots in order t0->0 kept, t1->1 kept,
    t2->0 dropped (0 full), t0->1 dropped, t1->0 dropped, t2->2 kept: 3 of 6 dropped."""
    logits = torch.tensor([[3.0, 2.0, 0.0], [2.0, 3.0, 0.0], [3.0, 0.0, 2.0]])
    r = route(logits, 2, 0.5)
    assert r.expert.tolist() == [0, 1, 0, 1, 0, 2]
    assert r.keep.tolist() == [True, True, False, False, False, True]
    layer = MoELayer(4, MoEConfig(n_expert=3, top_k=2, capacity_factor=0.5))
    with torch.no_grad():  # a router that reproduces these logits from one-hot-ish inputs
        layer.router.weight.copy_(torch.eye(3, 4) * 1.0)
    x = torch.cat([logits, torch.zeros(3, 1)], 1).reshape(1, 3, 4)
    layer.train()
    layer(x)
    layer(x)
    assert layer.slot_counts.tolist() == [6, 12]  # (dropped, routed) over two forwards
    layer.eval()
    layer(x)
    assert layer.slot_counts.tolist() == [6, 12]  # evaluation is not counted
    layer.reset_counts()
    assert layer.slot_counts is None


def test_load_balancing_loss_is_its_formula_on_a_hand_case():
    """k=1, E=2, probabilities (0.8, 0.2), (0.6, 0.4), (0.3, 0.7): f = (2/3, 1/3),
    P = (17/30, 13/30), L = 2 (2/3 * 17/30 + 1/3 * 13/30) = 94/90."""
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    r = route(probs.log(), 1, 2.0)
    assert float(r.aux_loss) == pytest.approx(94 / 90, abs=1e-12)
    uniform = route(torch.zeros(8, 4), 2, 1.0)  # ties: a balanced assignment is not guaranteed,
    assert float(uniform.aux_loss) == pytest.approx(1.0)  # but P_e = 1/E makes L = sum f_e = 1


@pytest.mark.parametrize(("k", "factor"), [(1, 1.0), (2, 1.25), (2, 0.6)])
def test_layer_output_and_gradients_match_the_per_token_loop(k, factor):
    torch.manual_seed(10 + k)
    layer = MoELayer(8, MoEConfig(n_expert=4, top_k=k, capacity_factor=factor), proj_std=0.1).double()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)  # a decided router: drops occur
        layer.b_fc.normal_()
        layer.b_proj.normal_()
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, 8, dtype=torch.float64)
    (layer(x) * w).sum().backward()
    got = [x.grad.clone(), *(p.grad.clone() for p in layer.parameters())]
    layer.zero_grad()
    x.grad = None
    out_ref = reference_layer(layer, x)
    (out_ref * w).sum().backward()
    want = [x.grad, *(p.grad for p in layer.parameters())]
    torch.testing.assert_close(layer(x), out_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_moe_models_are_language_models_of_the_one_registry():
    assert {"moe-tiny", "moe-small"} <= set(GPT_CONFIGS)
    tiny = GPT_CONFIGS["moe-tiny"]
    assert (tiny.n_layer, tiny.n_head, tiny.n_embd, tiny.block_size) == (2, 4, 64, 64)
    assert (tiny.moe.n_expert, tiny.moe.top_k, tiny.moe.capacity_factor) == (4, 2, 1.25)
    assert GPT_CONFIGS["moe-small"].moe.n_expert == 8
    with pytest.raises(ValueError, match="no experts"):
        build_gpt("gpt-tiny", ep_group=object())
    with pytest.raises(ValueError, match="top_k must be 1 or 2"):
        MoEConfig(n_expert=4, top_k=3)
    dense = build_gpt("gpt-tiny")
    dense(torch.zeros(1, 8, dtype=torch.long))
    assert auxiliary_loss(dense) is None


def test_moe_tiny_forward_and_a_few_steps_lower_the_loss_on_random_bytes():
    torch.manual_seed(0)
    model = build_model("moe-tiny", num_classes=0)
    opt = build_optimizer("adamw", model, 3e-3)
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    assert all(id(m.b_fc) in no_decay and id(m.w_fc) not in no_decay for m in model.moe_layers())
    data = torch.randint(0, 16, (8, 65))  # 16 of 256 byte values: learnable from the unigram alone
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(8):
        out = model(x)
        assert out.shape == (8, 64, 256)
        loss = F.cross_entropy(out.flatten(0, 1), y.flatten())
        aux = auxiliary_loss(model)
        assert aux is not None and aux.ndim == 0 and 0.0 < float(aux.detach()) < 0.01 * 2 * 4
        (loss + aux).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5
    dropped, routed = model.moe_slot_counts().tolist()
    assert routed == 8 * 2 * 8 * 64 * 2 and 0 <= dropped < routed  # steps x layers x slots

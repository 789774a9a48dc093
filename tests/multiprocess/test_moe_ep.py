"""The expert-parallel MoE layer (Gloo, W = 2, E = 4, one launch; moe_worker.py): dispatch and
combine by uneven all_to_all_single equal the all-local layer to round-off (outputs, input
and router gradients of each rank's tokens; each expert's gradients on its owning rank, summed
over every rank's tokens); through a lossy group at loss 0 bitwise the plain group, with the
four data all-to-alls of a step (dispatch and combine, forward and backward) counted; at 30%
loss different numbers and counted losses."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..launch import launch

WORKER = Path(__file__).with_name("moe_worker.py")
WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch(WORKER, WORLD, ["reference", "lossy"], tmp_path_factory.mktemp("moe") / "results.json")


def test_expert_parallel_layer_is_the_all_local_layer_to_round_off(ranks):
    for r in ranks:
        ref = r["reference"]
        assert ref["same_init"]  # one seed: every rank's experts are the all-local layer's slice
        assert (ref["output"], ref["input_grad"], ref["router_grad"]) == (True, True, True)
        assert ref["expert_grads"] == [True] * 4  # w_fc, b_fc, w_proj, b_proj of the owned experts
        assert ref["max_error"] < 1e-12  # float64
        assert ref["dropped"] > 0  # the capacity dropped slots, the same ones as the reference's
    splits = [r["reference"]["splits"] for r in ranks]
    assert any(len(set(s)) > 1 for s in splits)  # uneven: the splits the all-to-all really took
    assert splits[0][1] != splits[1][0]  # and the two directions carry different numbers of tokens


def test_lossy_group_sees_dispatch_and_combine_forward_and_backward(ranks):
    for r in ranks:
        lossy = r["lossy"]
        assert lossy["bitwise"]  # loss 0: outputs and every gradient bitwise the plain group's
        # one MoE layer, one step: dispatch + combine forward, their two backward all-to-alls;
        # the int64 count exchange is control traffic, not counted
        assert lossy["calls"] == 4
        sent, lost = lossy["lossless_counts"]
        assert sent > 0 and lost == 0
        calls, sent, lost = lossy["lossy_counts"]
        assert calls == 4 and 0 < lost < sent
        assert lossy["lossy_output_differs"] and lossy["lossy_grads_differ"]

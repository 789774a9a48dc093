"""The GPT's pipeline stages and the tensor-parallel refusal (one process; the tensor-parallel
forward itself runs in tests/multiprocess/test_group.py)."""

from __future__ import annotations

import pytest
import torch

from lossy_hooks.study.workloads.gpt import GPT, GPTConfig, GPTStage, build_gpt, tensor_parallel


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_stages_in_order_compute_the_models_forward_exactly(stages):
    torch.manual_seed(0)
    model = build_gpt("gpt-small").eval()  # 4 layers: 3 stages take 2, 1, 1 blocks
    parts = [GPTStage(model, s, stages) for s in range(stages)]
    assert sum(len(p.blocks) for p in parts) == 4
    assert [len(p.blocks) for p in parts] == [4 // stages + (s < 4 % stages) for s in range(stages)]
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = x
        for part in parts:
            h = part(h)
        assert torch.equal(h, model(x))
    owned = {id(p) for part in parts for p in part.parameters()}
    assert owned == {id(p) for p in model.parameters()}  # every parameter in exactly one stage
    assert sum(len(list(part.parameters())) for part in parts) == len(list(model.parameters()))


def test_more_stages_than_layers_and_tp_not_dividing_heads_are_refused():
    model = build_gpt("gpt-tiny")  # 2 layers, 4 heads
    with pytest.raises(ValueError, match="--pp 3 must be between 1 and the model's 2 layers"):
        GPTStage(model, 0, 3)

    class ThreeRanks:
        def size(self) -> int:
            return 3

    with pytest.raises(ValueError, match="--tp 3 must divide the model's 4 attention heads"):
        tensor_parallel(model, ThreeRanks())  # type: ignore[arg-type]


def test_sequence_parallel_needs_tp_to_divide_the_sequence():
    """DTensor's sequence shards are even: a 6-token model refuses --tp 4 with
    --sequence_parallel (the heads alone would allow it)."""

    class FourRanks:
        def size(self) -> int:
            return 4

    model = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=16, block_size=6))
    with pytest.raises(ValueError, match="--tp 4 must divide the model's 6-token sequences"):
        tensor_parallel(model, FourRanks(), sequence_parallel=True)  # type: ignore[arg-type]

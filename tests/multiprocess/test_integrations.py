"""The hook where users already train (2 Gloo ranks each): packets are really lost, at the
requested rate, on every rank, once per optimizer step; and the silent path (Lightning's own
comm-hook arguments on CPU) is reported, not believed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lossy_hooks import LossyState, lossy_allreduce_hook
from lossy_hooks.core.process_group import single_process_group
from lossy_hooks.core.statistics import binomial_interval
from lossy_hooks.integrations import HookNotReachedError, check_hook_reached, register_on_ddp

from ..launch import launch
from .integrations_worker import LOSS

WORKER = Path(__file__).with_name("integrations_worker.py")


def run(tmp_path, scenario: str) -> list[dict]:
    return [r[scenario] for r in launch(WORKER, 2, [scenario], tmp_path / f"{scenario}.json", timeout=900)]


def assert_lossy(ranks: list[dict], optimizer_steps: int) -> None:
    packets = ranks[0]["sent"] // ranks[0]["steps"]
    for r in ranks:
        assert r["steps"] == optimizer_steps  # the hook fires once per optimizer step
        assert r["sent"] == optimizer_steps * packets > 0
        lo, hi = binomial_interval(r["sent"], LOSS)
        assert lo <= r["lost"] <= hi, r
    assert ranks[0]["lost"] != ranks[1]["lost"]  # each rank draws its own masks


def test_lightning_callback_loses_packets_and_the_silent_path_is_reported(tmp_path):
    pytest.importorskip("lightning")
    ranks = run(tmp_path, "lightning")
    # 32 micro-batches per rank, accumulate 2, max_steps 12
    assert [r["optimizer_steps"] for r in ranks] == [12, 12]
    assert_lossy(ranks, 12)
    for r in ranks:
        silent = r["silent"]
        assert silent["sent"] == 0 and silent["hook_reached"] is False
        assert len(silent["warned"]) == 1 and "no gradient bucket has reached" in silent["warned"][0]


def test_accelerate_registration_loses_packets_once_per_accumulated_step(tmp_path):
    pytest.importorskip("accelerate")
    ranks = run(tmp_path, "accelerate")
    for r in ranks:
        assert r["wrapped"] == "DistributedDataParallel"
        assert r["micro_batches"] == 16  # 64 samples, 2 ranks, batch 2
    assert_lossy(ranks, 8)  # accumulate 2: the hook fires on every second micro-batch


def test_hf_trainer_callback_loses_packets(tmp_path):
    pytest.importorskip("transformers")
    ranks = run(tmp_path, "hf_trainer")
    assert [r["optimizer_steps"] for r in ranks] == [6, 6]
    assert_lossy(ranks, 6)


def test_registration_refuses_an_unwrapped_model_and_the_guard_names_the_problem():
    state = LossyState(loss_rate=0.1)
    with pytest.raises(TypeError, match="Lightning: the model is a Linear, not DistributedDataParallel"):
        register_on_ddp(nn.Linear(2, 2), state, "Lightning")
    with pytest.raises(HookNotReachedError, match="no gradient bucket reached the LossyState"):
        check_hook_reached(state, "Accelerate")


def test_state_reports_a_hook_registered_on_the_wrong_module():
    """Raw DDP: the hook is registered on a DDP wrapper, but the unwrapped module trains."""
    with single_process_group():
        module = nn.Linear(8, 2)
        ddp = nn.parallel.DistributedDataParallel(module)
        state = LossyState(loss_rate=0.5)
        ddp.register_comm_hook(state, lossy_allreduce_hook)
        module(torch.ones(4, 8)).sum().backward()  # the wrong object trains
        with pytest.warns(RuntimeWarning, match="no gradient bucket has reached this LossyState"):
            st = state.stats()
        assert st["hook_reached"] is False and st["worker"]["packets_sent"] == 0 and "warning" in st
        ddp(torch.ones(4, 8)).sum().backward()
        st = state.stats()
        assert st["hook_reached"] is True and "warning" not in st and st["worker"]["packets_sent"] == 1
        assert dist.is_initialized()


def test_registration_names_parameters_for_protect():
    """protect= needs names: the helpers take them from the wrapped module (no 'module.')."""
    with single_process_group():
        model = nn.Linear(8, 2)
        state = LossyState(loss_rate=1.0, fill="zero", protect=r"^bias$")
        ddp = register_on_ddp(nn.parallel.DistributedDataParallel(model), state, "Accelerate")
        ddp(torch.ones(3, 8)).sum().backward()
        assert torch.equal(model.bias.grad, torch.full((2,), 3.0))  # protected: arrives
        assert state.stats()["worker"]["protected_packets"] == 1

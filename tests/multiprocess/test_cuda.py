"""The hook on CUDA buckets (skipped without a GPU): NCCL at world size 1 and Gloo on CUDA
tensors at world size 2 on one GPU; train_ddp.py on CUDA with a kill and --resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ..launch import launch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

WORKER = Path(__file__).with_name("cuda_worker.py")
SCENARIOS = ["stats_before_and_after_resume", "dtypes_and_bitwise", "no_device_sync", "fsdp_no_device_sync"]


@pytest.fixture(scope="module", params=[("nccl", 1), ("gloo", 2)], ids=["nccl-W1", "gloo-cuda-W2"])
def runs(request, tmp_path_factory):
    backend, world = request.param
    out = tmp_path_factory.mktemp(backend) / "results.json"
    return world, launch(WORKER, world, [backend, *SCENARIOS], out)


def test_stats_before_any_bucket_and_resume_from_a_cuda_checkpoint(runs):
    world, ranks = runs
    for rank in range(world):
        r = ranks[rank]["stats_before_and_after_resume"]
        assert r["before_steps"] == 0
        assert r["after_load_lost"] > 0
        assert r["same_losses"] and r["params_finite"]


def test_cuda_buckets_bitwise_at_loss_zero_and_finite_in_half_dtypes(runs):
    world, ranks = runs
    for rank in range(world):
        r = ranks[rank]["dtypes_and_bitwise"]
        assert all(r.values()), r


def test_hook_never_synchronises_the_device(runs):
    world, ranks = runs
    for rank in range(world):
        r = ranks[rank]["no_device_sync"]
        assert all(v == "" for v in r.values()), r


def test_fsdp_collectives_never_synchronise_the_device(runs):
    world, ranks = runs
    for rank in range(world):
        r = ranks[rank]["fsdp_no_device_sync"]
        assert all(v == "" for v in r.values()), r
        if world == 1:  # NCCL: every configuration ran
            assert len(r) == 6

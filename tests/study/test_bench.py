"""The benchmark script's "alone" part still runs and reports every model, dtype and variant
(timings themselves are not asserted: speed is measured by hand, docs/performance.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_hook.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_hook", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_alone_reports_every_model_dtype_and_variant():
    bench = load_bench()
    rows = bench.bench_alone(torch.device("cpu"), mtu=1500, reps=1)
    keys = {(r["dtype"], r["loss_model"], r["work"]) for r in rows}
    assert len(rows) == len(keys) == 2 * len(bench.MODELS) * 3
    for r in rows:
        element_size = 4 if r["dtype"] == "float32" else 2
        per_packet = 1500 // element_size
        assert r["packets"] == -(-(25 * 2**20 // element_size) // per_packet) == 17477
        assert r["seconds"] > 0 and r["copy_seconds"] > 0 and r["ratio_to_copy"] > 0
        assert r["allocated_bytes"] > 0  # every variant allocates at least its mask


def test_bench_hadamard_reports_every_block_and_its_padding():
    bench = load_bench()
    rows = bench.bench_hadamard(torch.device("cpu"), numel=5000, blocks=[1024, 8192], reps=1)
    assert [r["block"] for r in rows] == [1024, 8192]
    assert [r["padded_elements"] for r in rows] == [120, 120]  # 4 x 1024 + 1024; 4096 + 1024
    assert all(r["encode_seconds"] > 0 and r["decode_seconds"] > 0 and r["ratio_to_copy"] > 0 for r in rows)


def test_bench_step_part_runs_and_times_the_hook(tmp_path):
    """The step part (2 Gloo ranks, the hook wrapped for host timing) runs end to end: a
    change to the hook's private signatures must not silently break the benchmark."""
    import json
    import subprocess
    import sys

    out = tmp_path / "step.json"
    cmd = [sys.executable, str(BENCH), "--part", "step", "--cpu", "--models", "resnet18"]
    cmd += ["--batch_sizes", "2", "--image_size", "32", "--reps", "1", "--steps", "1"]
    cmd += ["--configs", "allreduce_hook", "worker 10% rescale", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {r["config"]: r for r in json.loads(out.read_text())["step"]}
    assert set(rows) == {"allreduce_hook", "worker 10% rescale"}
    assert rows["allreduce_hook"]["ratio_to_allreduce_hook"] == 1.0
    assert rows["worker 10% rescale"]["hook_host_ms_per_step"] > 0


def test_bench_fsdp_runs_every_configuration(tmp_path):
    """bench/bench_fsdp.py end to end (2 Gloo ranks, gpt-tiny, one repetition)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "fsdp.json"
    script = BENCH.with_name("bench_fsdp.py")
    cmd = [sys.executable, str(script), "--cpu", "--model", "gpt-tiny", "--batch_size", "2"]
    cmd += ["--reps", "2", "--steps", "1", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    spec = importlib.util.spec_from_file_location("bench_fsdp", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(bench.CONFIGS)
    assert rows["plain FSDP2"]["ratio_of_medians"] == rows["plain FSDP2"]["paired_ratio_median"] == 1.0
    assert all(r["median_ms"] > 0 for r in rows.values())

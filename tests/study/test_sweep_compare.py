"""Sweep (skip, resume, failure handling) and compare on runs made by a tiny sweep."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lossy_hooks import compare, sweep
from lossy_hooks.sweep import expand_grid, flags_for

# The 18-image colour folder: ResNet-18 learns it above chance in 4 epochs of 3 steps, and
# the two rounds (seeds 0, 1) end at different accuracies, so mean and std are checked on
# real spread, not on 0 against 0.
FIXED = {
    "dataset": "folder",
    "model": "resnet18",
    "num_epochs": 4,
    "batch_size": 6,
    "learning_rate": 0.01,
    "accumulation_steps": 1,
    "lab_round": 2,
    "workers": 0,
    "use_avg": True,
    "worker_drop": True,
}


def test_grid_and_flags():
    combos = expand_grid({"loss_rate": [0, 0.1], "fill": ["zero", "rescale"]})
    assert combos == [
        {"loss_rate": 0, "fill": "zero"},
        {"loss_rate": 0, "fill": "rescale"},
        {"loss_rate": 0.1, "fill": "zero"},
        {"loss_rate": 0.1, "fill": "rescale"},
    ]
    assert flags_for({"loss_rate": 0.1, "use_zero": True, "use_avg": False, "mtu": 1500}) == [
        "--loss_rate",
        "0.1",
        "--use_zero",
        "--mtu",
        "1500",
    ]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("sweep")
    fixed = {**FIXED, "data_path": str(image_folder), "output_dir": str(out / "runs")}
    grid = {"loss_rate": [0.0, 0.3], "mtu": [1500, 2]}  # mtu 2 < one fp32 element: invalid
    first = sweep.run_sweep(1, fixed, grid, out / "logs")
    return out, fixed, grid, first


def test_sweep_runs_skips_resumes_and_reports_failures(swept):
    _, fixed, grid, first = swept
    outcomes = [r["outcome"] for r in first]
    invalid = (
        "invalid flags (train_ddp.py: error: --mtu must be >= 4 bytes (one fp32 gradient element), got 2)"
    )
    assert outcomes == ["finished", invalid, "finished", invalid]
    # a second sweep launches nothing for finished configurations
    again = sweep.run_sweep(1, fixed, grid)
    assert [r["outcome"] for r in again] == ["skipped (finished)", invalid] * 2
    # an interrupted configuration (round 1 not ended) is resumed, not redone
    run_dir = Path(first[2]["run_dir"])
    (run_dir / "round1" / "status.json").unlink()
    rows_before = (run_dir / "round1" / "metrics.csv").read_text()
    resumed = sweep.run_sweep(1, fixed, {"loss_rate": [0.3], "mtu": [1500]})
    assert resumed[0]["outcome"] == "finished"
    assert (run_dir / "round1" / "metrics.csv").read_text() == rows_before  # no row lost or repeated
    assert sweep.main(["--nproc", "1", "--grid", "mtu=2", "--", *sweep.flags_for(fixed)]) == 1


def test_compare_on_swept_runs(swept, capsys):
    out, _, _, first = swept
    runs = out / "runs"
    assert compare.main([str(runs), "--target_acc", "0.05"]) == 0
    assert "2 configurations" in capsys.readouterr().out
    result = out / "runs" / "compare"
    for name in ("compare.csv", "accuracy_vs_loss_rate.png", "time_to_target.png", "curves.png"):
        assert (result / name).stat().st_size > 0, name
    assert not (result / "accuracy_vs_mtu.png").exists()  # one mtu value only
    with open(result / "compare.csv", newline="") as fh:
        table = {r["name"]: r for r in csv.DictReader(fh)}
    for rec in first[::2]:
        run_dir = Path(rec["run_dir"])
        row = table[run_dir.name]
        finals = []
        for k in (0, 1):
            with open(run_dir / f"round{k}" / "metrics.csv", newline="") as fh:
                finals.append(float(list(csv.DictReader(fh))[-1]["val_acc"]))
        if rec["settings"]["loss_rate"] == 0.0:  # the spread is real: rounds differ, above chance
            assert finals[0] != finals[1] and max(finals) > 1 / 3
        assert float(row["final_mean"]) == pytest.approx(sum(finals) / 2, abs=1e-5)
        std = math.sqrt(sum((f - sum(finals) / 2) ** 2 for f in finals))  # sample std of 2 values
        assert float(row["final_std"]) == pytest.approx(std, abs=1e-5)
        cfg = json.loads((run_dir / "config.json").read_text())
        assert float(row["loss_rate"]) == pytest.approx(cfg["long_run_loss_rate"])
        assert row["rounds"] == "2"


def test_sweep_help_names_the_separator(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--help"])
    text = capsys.readouterr().out
    assert "[-- TRAIN_DDP_FLAGS ...]" in text and "after a lone '--'" in text


def test_sweep_config_file(tmp_path, capsys):
    """A TOML file gives nproc, fixed flags and grid; invalid configurations are reported
    (exit 1) without stopping the others."""
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(
        'nproc = 1\n[fixed]\ndataset = "digits"\nmodel = "squeezenet1_1"\n'
        f'output_dir = "{tmp_path / "runs"}"\n[grid]\nmtu = [1, 2, 3]\n'
    )
    assert sweep.main(["--config", str(cfg), "--grid", "loss_rate=0,0.5"]) == 1
    assert not (tmp_path / "runs").exists()  # nothing launched: every mtu is below one element
    captured = capsys.readouterr()
    assert "usage: sweep" not in captured.err and "usage:" not in captured.out  # no train_ddp usage
    assert "train_ddp.py: error: --mtu must be >= 4" in captured.out


def test_flags_with_several_values_and_switches_match_train_ddp_parser():
    """--fec G R passes through the sweep (after --, in a grid, in a config list), and the
    sweep knows every switch and multi-value flag train_ddp.py has."""
    import argparse

    from lossy_hooks.study.flags import build_parser
    from lossy_hooks.sweep import BOOLEAN_FLAGS, MULTI_VALUE_FLAGS, flags_for, parse_fixed

    fixed = parse_fixed(["--fec", "8", "1", "--use_avg", "--loss_model", "random 10%", "--lr_x", "-1"])
    assert fixed == {"fec": [8, 1], "use_avg": True, "loss_model": "random 10%", "lr_x": -1}
    assert flags_for({"fec": [8, 1]}) == flags_for({"fec": "8 1"}) == ["--fec", "8", "1"]
    actions = build_parser()._actions
    switches = {a.dest for a in actions if isinstance(a, argparse._StoreTrueAction)}
    assert switches - {"resume"} <= BOOLEAN_FLAGS  # --resume is the sweep's own business
    assert {a.dest for a in actions if isinstance(a.nargs, int) and a.nargs > 1} == MULTI_VALUE_FLAGS


TORCHRUN_REPORT = """Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/usr/lib/python3/site-packages/torch/distributed/launcher/api.py", line 386, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
train_ddp.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-02_01:33:37
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 15552)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def test_a_failed_launch_shows_why_and_where_its_log_is(tmp_path, monkeypatch, capsys):
    """A launch that fails after its flags were accepted (a stand-in for torchrun writing what
    it writes: the rank's traceback, then its own ChildFailedError report): the rank's last
    lines and the report's rank and exit code are printed right after it, the exception line
    (markup-like text kept as it is) is in the end table, and the whole log is kept even
    without --log_dir."""

    def failing_launch(argv, nproc, log=None):
        log.write("".join(f"[rank1]: step {i}\n" for i in range(30)))
        log.write('Traceback (most recent call last):\n  File "train_ddp.py", line 9, in <module>\n')
        log.write("[rank1]: RuntimeError: out of memory [/x]\n" + TORCHRUN_REPORT)
        return subprocess.CompletedProcess(argv, 1)

    monkeypatch.setattr(sweep, "launch_train", failing_launch)
    monkeypatch.setenv("COLUMNS", "300")  # the end table on one line per row
    fixed = ["--dataset", "digits", "--model", "squeezenet1_1", "--output_dir", str(tmp_path / "runs")]
    assert sweep.main(["--nproc", "1", "--", *fixed]) == 1
    out = capsys.readouterr().out
    log = Path(re.search(r"\(the whole output: (\S+)\)", out).group(1))
    assert log.read_text().endswith(TORCHRUN_REPORT)  # kept: it failed
    shown = out[: out.index("(the whole output")]
    assert "[rank1]: step 29" in shown and "[rank1]: RuntimeError: out of memory [/x]" in shown
    assert "torchrun: rank 1 (local_rank: 1) failed, exitcode 1 (pid: 15552)" in shown
    assert "[rank1]: step 10" not in shown and "Root Cause" not in shown  # the rank's last lines
    table = out[out.index("sweep: 1 configurations") :]
    assert "failed (exit 1): [rank1]: RuntimeError: out of memory [/x]" in table and "log:" in table
    records = sweep.run_sweep(1, sweep.parse_fixed(fixed), {}, tmp_path / "logs")
    assert records[0]["outcome"] == "failed (exit 1)"
    assert Path(records[0]["log"]) == tmp_path / "logs" / "config000.log"


def test_sweep_reads_toml_with_tomli_on_python_3_10(tmp_path):
    """On Python 3.10 (no tomllib) the sweep reads its TOML file with tomli: simulated in a
    fresh interpreter that reports version 3.10 and cannot import tomllib."""
    cfg = tmp_path / "sweep.toml"
    cfg.write_text('nproc = 3\n[fixed]\ndataset = "digits"\n[grid]\nmtu = [1500, 9000]\n')
    code = (  # the sweep's own imports first (torch checks the version too), then the sweep
        "import sys, rich.console, rich.progress, rich.table, lossy_hooks.study.cli\n"
        "sys.modules['tomllib'] = None; real = sys.version_info; sys.version_info = (3, 10, 14)\n"
        "from lossy_hooks import sweep\n"
        "sys.version_info = real\n"
        f"print(sweep.tomllib.__name__, sweep._load_config({str(cfg)!r}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expected = {"nproc": 3, "fixed": {"dataset": "digits"}, "grid": {"mtu": [1500, 9000]}}
    assert res.stdout.strip() == f"tomli {expected}"

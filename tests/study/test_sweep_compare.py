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

from lossy_hooks.study.sweeping import runner
from lossy_hooks.study.sweeping.grid import expand_grid, flags_for, parse_fixed
from lossy_hooks.study.sweeping.launch import run_dir_for
from lossy_hooks.study.sweeping.planning import plan
from lossy_hooks.study.sweeping.runner import run_sweep
from lossy_hooks.tools import compare, sweep

from .study_batch import WarmLauncher

# The 18-image colour folder: ResNet-18 learns it above chance in 4 epochs of 3 steps, and
# the two rounds (seeds 0, 1) end at different accuracies, so mean and std are checked on
# real spread, not on 0 against 0.
FIXED = {
    "dataset": "folder",
    "model": "resnet18",
    "num_epochs": 2,
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
def warm_sweep(tmp_path_factory):
    """The sweeps below launch train_ddp.py through warm workers (one process that stays up,
    tests/study/study_batch.py) instead of a torchrun launch per configuration: the sweep's
    own logic (skip, resume, failures) is what they check; README's sweep command, the
    installed package's sweep and the cluster sweeps launch with torchrun."""
    warm = WarmLauncher(tmp_path_factory.mktemp("warm"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "launch_train", warm)
        yield warm
    warm.close()


@pytest.fixture(scope="module")
def swept(tmp_path_factory, image_folder, warm_sweep):
    out = tmp_path_factory.mktemp("sweep")
    fixed = {**FIXED, "data_path": str(image_folder), "output_dir": str(out / "runs")}
    grid = {"loss_rate": [0.0, 0.3], "mtu": [1500, 2]}  # mtu 2 < one fp32 element: invalid
    first = run_sweep(1, fixed, grid, out / "logs")
    return out, fixed, grid, first


def test_sweep_runs_skips_resumes_and_reports_failures(swept, warm_sweep):
    _, fixed, grid, first = swept
    outcomes = [r["outcome"] for r in first]
    invalid = (
        "invalid flags (train_ddp.py: error: --mtu must be >= 4 bytes (one fp32 gradient element), got 2)"
    )
    assert outcomes == ["finished", invalid, "finished", invalid]
    # a second sweep launches nothing for finished configurations
    again = run_sweep(1, fixed, grid)
    assert [r["outcome"] for r in again] == ["skipped (finished)", invalid] * 2
    # an interrupted configuration (round 1 not ended) is resumed, not redone
    run_dir = Path(first[2]["run_dir"])
    (run_dir / "round1" / "status.json").unlink()
    rows_before = (run_dir / "round1" / "metrics.csv").read_text()
    resumed = run_sweep(1, fixed, {"loss_rate": [0.3], "mtu": [1500]})
    assert resumed[0]["outcome"] == "finished"
    assert (run_dir / "round1" / "metrics.csv").read_text() == rows_before  # no row lost or repeated
    assert sweep.main(["--nproc", "1", "--grid", "mtu=2", "--", *flags_for(fixed)]) == 1
    assert len(warm_sweep.launches) == 3  # the two valid configurations, then the resumed one


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
    from lossy_hooks.study.sweeping.grid import BOOLEAN_FLAGS, MULTI_VALUE_FLAGS

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

    monkeypatch.setattr(runner, "launch_train", failing_launch)
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
    records = run_sweep(1, parse_fixed(fixed), {}, tmp_path / "logs")
    assert records[0]["outcome"] == "failed (exit 1)"
    assert Path(records[0]["log"]) == tmp_path / "logs" / "config000.log"


def test_sweep_reads_toml_with_tomli_on_python_3_10(tmp_path):
    """On Python 3.10 (no tomllib) the sweep reads its TOML file with tomli: simulated in a
    fresh interpreter that reports version 3.10 and cannot import tomllib."""
    cfg = tmp_path / "sweep.toml"
    cfg.write_text('nproc = 3\n[fixed]\ndataset = "digits"\n[grid]\nmtu = [1500, 9000]\n')
    code = (  # the sweep's own imports first (torch checks the version too), then the sweep
        "import sys, rich.console, rich.progress, rich.table, lossy_hooks.study.sweeping.runner\n"
        "sys.modules['tomllib'] = None; real = sys.version_info; sys.version_info = (3, 10, 14)\n"
        "from lossy_hooks.tools import sweep\n"
        "sys.version_info = real\n"
        f"print(sweep.tomllib.__name__, sweep._load_config({str(cfg)!r}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expected = {"nproc": 3, "fixed": {"dataset": "digits"}, "grid": {"mtu": [1500, 9000]}}
    assert res.stdout.strip() == f"tomli {expected}"


# -------------------------------------------------------------- one folder per configuration
# Per study setting: flags that make it take effect (context) and a non-default value. Every
# flag of train_ddp.py that is not a control flag must be here (checked below), so a new
# setting cannot be left out of the folder name.
NAME_BASE = ["--dataset", "digits", "--model", "squeezenet1_1"]
LOSS = ["--loss_rate", "0.1"]
RING = ["--algorithm", "ring", "--worker_drop"]
GPT_FSDP = ["--dataset", "text", "--model", "gpt-tiny", "--strategy", "fsdp", "--worker_drop"]
NET = ["--bandwidth_gbps", "10"]
GPT_TEXT = ["--dataset", "text", "--model", "gpt-tiny"]
SETTING_CHANGES: dict[str, tuple[list[str], list[str]]] = {
    "num_epochs": ([], ["--num_epochs", "3"]),
    "batch_size": ([], ["--batch_size", "32"]),
    "learning_rate": ([], ["--learning_rate", "0.1"]),
    "accumulation_steps": ([], ["--accumulation_steps", "2"]),
    "loss_rate": ([], LOSS),
    "mtu": ([], ["--mtu", "1500"]),
    "use_zero": ([], ["--use_zero"]),
    "use_avg": ([], ["--use_avg"]),
    "lab_round": ([], ["--lab_round", "2"]),
    "worker_drop": ([], ["--worker_drop"]),
    "loss_model": ([], ["--loss_model", "gemodel 1% 20%"]),
    "drop_point": ([], ["--drop_point", "both"]),
    "post_sync": ([], ["--post_sync", "independent"]),
    "fill": ([], ["--fill", "zero"]),
    "packetization": ([], ["--packetization", "tensor"]),
    "bucket_cap_mb": ([], ["--bucket_cap_mb", "1"]),
    "model": ([], ["--model", "resnet18"]),
    "dataset": ([], ["--dataset", "fake"]),
    "corpus_mb": (["--dataset", "text", "--model", "gpt-tiny"], ["--corpus_mb", "0.5"]),
    "strategy": (["--dataset", "text", "--model", "gpt-tiny", "--worker_drop"], ["--strategy", "fsdp"]),
    "optimizer": ([], ["--optimizer", "adamw"]),
    "all_gather_loss_rate": (GPT_FSDP, ["--all_gather_loss_rate", "0.01"]),
    "all_gather_fill": ([*GPT_FSDP, "--all_gather_loss_rate", "0.01"], ["--all_gather_fill", "zero"]),
    "imagenette_size": ([], ["--imagenette_size", "160px"]),
    "seed": ([], ["--seed", "1"]),
    "max_steps": ([], ["--max_steps", "5"]),
    "eval_every": ([], ["--eval_every", "2"]),
    "amp": ([], ["--amp"]),
    "amp_init_scale": (["--amp"], ["--amp_init_scale", "1024"]),
    "tag": ([], ["--tag", "probe"]),
    "measure_fidelity": ([], ["--measure_fidelity"]),
    "measure_drift": ([], ["--measure_drift", "2"]),
    "resync": ([], ["--resync", "2"]),
    "counts_transport": ([], ["--counts_transport", "separate"]),
    "algorithm": (["--worker_drop"], ["--algorithm", "ring"]),
    "ranks_per_node": (RING, ["--ranks_per_node", "2"]),
    "link_loss": (RING, ["--link_loss", "0->1=5%"]),
    "encoding": ([], ["--encoding", "hadamard"]),
    "hadamard_block": (["--encoding", "hadamard"], ["--hadamard_block", "1024"]),
    "wire_dtype": ([], ["--wire_dtype", "bf16"]),
    "error_feedback": (["--worker_drop", "--use_zero"], ["--error_feedback"]),
    "protect": ([], ["--protect", "bias"]),
    "retransmit": ([], ["--retransmit", "1"]),
    "fec": ([], ["--fec", "8", "1"]),
    "bandwidth_gbps": ([], NET),
    "latency_us": (NET, ["--latency_us", "20"]),
    "jitter": (NET, ["--jitter", "lognormal 4 1"]),
    "straggler_prob": (NET, ["--straggler_prob", "0.1"]),
    "straggler_factor": ([*NET, "--straggler_prob", "0.1"], ["--straggler_factor", "3"]),
    "net_drop_rate": (NET, ["--net_drop_rate", "0.001"]),
    "rto_us": (NET, ["--rto_us", "500"]),
    "tp": (GPT_TEXT, ["--tp", "2"]),
    "sequence_parallel": ([*GPT_TEXT, "--tp", "2"], ["--sequence_parallel"]),
    "pp": (GPT_TEXT, ["--pp", "2"]),
    "pp_schedule": ([*GPT_TEXT, "--pp", "2", "--accumulation_steps", "2"], ["--pp_schedule", "1f1b"]),
    "ep": ([*GPT_TEXT, "--model", "moe-tiny"], ["--ep", "2"]),
    "traffic_loss": ([*GPT_TEXT, "--tp", "2"], ["--traffic_loss", "tp=1%"]),
    "traffic_fill": ([*GPT_TEXT, "--tp", "2", "--traffic_loss", "tp=1%"], ["--traffic_fill", "stale"]),
}


def _folder(argv: list[str], world: int = 4) -> Path:
    run_dir, error = run_dir_for(argv, world)
    assert run_dir is not None, f"{argv}: {error}"
    return run_dir


def test_every_setting_that_changes_a_run_changes_its_folder():
    """Each study setting off its default (in a context where it takes effect) names another
    folder; control flags (output folder, workers, ...) do not. Issue 41: learning rate,
    batch size, seed and epochs used to be missing, so a grid over them shared one folder."""
    from lossy_hooks.study.flags import build_parser
    from lossy_hooks.study.run_names import CONTROL_FLAGS

    settings = set(vars(build_parser(prog="train_ddp.py").parse_args([]))) - CONTROL_FLAGS
    assert settings == set(SETTING_CHANGES), "every study flag needs an entry in SETTING_CHANGES"
    for name, (context, change) in SETTING_CHANGES.items():
        before, after = _folder([*NAME_BASE, *context]), _folder([*NAME_BASE, *context, *change])
        assert before != after, f"--{name}: {change} leaves the folder {before.name}"
    base = _folder(NAME_BASE)
    assert _folder([*NAME_BASE, "--workers", "3", "--resume"]) == base  # control flags
    assert _folder([*NAME_BASE, "--hadamard_block", "1024"]) == base  # no effect without Hadamard
    # the readable parts of the settings that were missing
    name = _folder(
        [*NAME_BASE, "--num_epochs", "6", "--batch_size", "32", "--lr", "0.02", "--seed", "2"]
    ).name
    assert name.endswith("_ep6_bs32_lr0p02_seed2"), name


def test_a_long_name_ends_in_the_configuration_hash():
    """Past MAX_NAME_CHARS the name keeps its first parts and a hash of every setting off
    its default: two configurations that differ only past the cut still differ, the same
    configuration gets the same name, and config_identity holds the whole configuration."""
    import hashlib
    import os

    from lossy_hooks.study.cli import resolve
    from lossy_hooks.study.flags import build_parser
    from lossy_hooks.study.run_names import HASH_CHARS, MAX_NAME_CHARS, config_identity, config_name

    long = [*NAME_BASE, "--tag", "t" * 150, "--jitter", "lognormal 4 1", *NET]
    a, b = _folder([*long, "--seed", "1"]), _folder([*long, "--seed", "2"])
    assert a != b and len(a.name) <= MAX_NAME_CHARS and len(b.name) <= MAX_NAME_CHARS
    assert a == _folder([*long, "--seed", "1"])
    os.environ.update(RANK="0", WORLD_SIZE="4")
    try:
        parser = build_parser(prog="train_ddp.py")
        cfg = resolve(parser.parse_args([*long, "--seed", "1"]), parser)
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]
    identity = json.loads(config_identity(cfg))
    assert identity["seed"] == 1 and identity["tag"] == "t" * 150 and "output_dir" not in identity
    digest = hashlib.sha256(config_identity(cfg).encode()).hexdigest()[:HASH_CHARS]
    assert config_name(cfg) == a.name and a.name.endswith(f"_cfg{digest}")


@pytest.mark.parametrize("setting", ["learning_rate", "batch_size", "seed", "num_epochs"])
def test_a_grid_over_a_setting_once_missing_from_the_name_plans_one_folder_each(tmp_path, setting):
    """plan (what every sweep does before it launches) over each setting that was
    missing from the folder name: one folder per configuration, and sweep.json lists both."""
    from rich.console import Console

    values = {"learning_rate": [0.01, 0.1], "batch_size": [16, 32], "seed": [0, 1], "num_epochs": [1, 2]}
    fixed = {"dataset": "digits", "model": "squeezenet1_1", "output_dir": str(tmp_path / "runs")}
    records = plan(fixed, {setting: values[setting]}, 2, Console(quiet=True))
    folders = {r["run_dir"] for r in records}
    assert len(folders) == 2 and all("outcome" not in r for r in records)  # both to run
    planned = json.loads((tmp_path / "runs" / "sweep.json").read_text())["configurations"]
    assert sorted(planned) == sorted(Path(f).name for f in folders)
    assert sorted(p["settings"][setting] for p in planned.values()) == values[setting]


def test_a_sweep_that_would_share_a_folder_refuses_before_anything(tmp_path, capsys):
    """Two configurations that name one folder (a grid over a control flag, or a value
    twice): exit 2 naming the folder and both configurations, nothing written or launched."""
    out = tmp_path / "runs"
    argv = ["--nproc", "1", "--grid", "workers=0,2", "--", "--dataset", "digits", "--output_dir", str(out)]
    with pytest.raises(SystemExit) as e:
        sweep.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "2 configurations would share 1 run folder" in err and "workers=0; workers=2" in err
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        sweep.main(
            ["--nproc", "1", "--grid", "seed=1,1", "--", "--dataset", "digits", "--output_dir", str(out)]
        )
    assert e.value.code == 2 and not out.exists()

"""train_ddp.py end to end: torchrun (Gloo, CPU, 2 ranks), world size 1, bad flags, kill/resume."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lossy_hooks.core.statistics import binomial_interval
from lossy_hooks.study.cli import resolve
from lossy_hooks.study.flags import build_parser
from lossy_hooks.study.run_control import FAULT_ENV
from lossy_hooks.study.workloads.models import build_model
from lossy_hooks.tools.bucket_layout import bucket_layout

from ..launch import ROOT, free_port
from .study_batch import Run, SharedRuns, uses, wanted_runs

sys.path.insert(0, str(ROOT))
import train_ddp

SMALL = ["--model", "squeezenet1_1", "--workers", "0"]


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(ROOT / "train_ddp.py"),
        *args,
    ]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def only_dir(root: Path) -> Path:
    dirs = [d for d in root.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--loss_rate", "1.5"], "--loss_rate must be in [0, 1]"),
        (["--loss_rate", "-0.1"], "--loss_rate must be in [0, 1]"),
        (["--mtu", "0"], "--mtu must be >= 4"),
        (["--batch_size", "0"], "--batch_size must be >= 1"),
        (["--num_epochs", "0"], "--num_epochs must be >= 1"),
        (["--accumulation_steps", "0"], "--accumulation_steps must be >= 1"),
        (["--lab_round", "0"], "--lab_round must be >= 1"),
        (["--learning_rate", "-1"], "--learning_rate must be > 0"),
        (["--bucket_cap_mb", "0"], "--bucket_cap_mb must be > 0"),
        (["--model", "resnet9000"], "--model 'resnet9000' is neither a torchvision classification model"),
        (["--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["--dataset", "folder", "--data_path", "/nonexistent"], "does not exist"),
        (["--dataset", "imagenette", "--data_path", "/tmp/nothing-here"], "Imagenette (320px) not found"),
        (["--loss_model", "gemodel"], "--loss_model: loss model 'gemodel' takes 1 to 4"),
        (["--loss_model", "random 5%", "--loss_rate", "0.1"], "not both"),
        (["--fill", "stale", "--worker_drop"], "fill='stale' needs drop_point='post'"),
        (["--drop_point", "post", "--worker_drop"], "contradicts"),
        (["--amp_init_scale", "0"], "--amp_init_scale must be > 0"),
        (["--max_steps", "0"], "--max_steps must be >= 1"),
        (["--error_feedback", "--drop_point", "post", "--use_zero"], "error_feedback resends"),
        (["--fec", "8", "0"], "fec must be (g, r)"),
        (["--retransmit", "-1"], "retransmit must be a whole number"),
        (["--hadamard_block", "1000", "--encoding", "hadamard"], "hadamard_block must be a power of two"),
        (["--encoding", "rot"], "invalid choice: 'rot'"),
        (["--protect", "("], "protect: '(' is not a regular expression"),
        (["--error_feedback", "--use_zero", "--worker_drop", "--amp"], "--error_feedback with --amp"),
    ],
)
def test_bad_flags_exit_2_with_message(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train_ddp.main([*flags, "--output_dir", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing created


@pytest.mark.parametrize(
    "flag, claim, bad, message",
    [
        ("--straggler_prob", "in [0, 1]", ["--straggler_prob", "1.5"], "--straggler_prob must be in [0, 1]"),
        ("--rto_us", "(> 0)", ["--rto_us", "0"], "--rto_us must be > 0"),
        ("--retransmit", "K >= 0", ["--retransmit", "-1"], "retransmit must be a whole number of tries >= 0"),
        ("--loss_model", "[0%, 100%]", ["--loss_model", "random 150%"], "must be between 0% and 100%"),
        ("--loss_model", "D > 0", ["--loss_model", "deadline -2x"], "deadline must be > 0"),
        ("--batch_size", "(>= 1)", ["--batch_size", "0"], "--batch_size must be >= 1"),
        ("--learning_rate", "(> 0)", ["--learning_rate", "0"], "--learning_rate must be > 0"),
        ("--drop_point", "post is refused", ["--worker_drop", "--drop_point", "post"], "contradicts"),
        ("--fill", "--fill rescale or stale is refused", ["--use_zero", "--fill", "rescale"], "contradicts"),
    ],
)
def test_help_states_the_range_the_parser_enforces(flag, claim, bad, message, capsys, tmp_path):
    """Each flag's help gives its unit and range, and the parser refuses what it says it does."""
    helps = {opt: a.help.replace("%%", "%") for a in build_parser()._actions for opt in a.option_strings}
    assert claim in helps[flag], (flag, helps[flag])
    with pytest.raises(SystemExit) as exc:
        train_ddp.main([*bad, "--bandwidth_gbps", "10", "--output_dir", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_what_the_help_allows_is_accepted():
    """The combinations the help does not refuse: --worker_drop with --drop_point both, --use_zero
    with --fill zero, AdamW's learning rate, a 0.9x deadline."""
    parser = build_parser()
    for flags, key, value in (
        (["--worker_drop", "--drop_point", "both"], "drop_point", "both"),
        (["--use_zero", "--fill", "zero"], "fill", "zero"),
        (["--optimizer", "adamw", "--learning_rate", "0.003"], "learning_rate", 0.003),
        (["--loss_model", "deadline 0.9x", "--bandwidth_gbps", "10"], "loss_model", "deadline 0.9x"),
    ):
        assert resolve(parser.parse_args(flags), parser)[key] == value, flags


def test_resume_of_a_run_saved_under_another_hadamard_default(tmp_path, capsys):
    """A run folder whose config.json names the old default block (4096) resumes when the
    run has no encoding (the block does nothing there); with --encoding hadamard the block
    is part of the configuration and a change is refused."""
    import json

    from lossy_hooks.study.cli import prepare_run_dir
    from lossy_hooks.study.run_names import config_name

    parser = build_parser()
    for extra, refused in (([], False), (["--encoding", "hadamard"], True)):
        flags = ["--dataset", "digits", "--output_dir", str(tmp_path / str(refused)), *extra]
        cfg = resolve(parser.parse_args([*flags, "--resume"]), parser)
        run_dir = tmp_path / str(refused) / config_name(cfg)
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(cfg | {"hadamard_block": 4096, "resume": False}))
        if refused:
            with pytest.raises(SystemExit):
                prepare_run_dir(cfg, parser)
            assert "hadamard_block: saved 4096, now 262144" in capsys.readouterr().err
        else:
            assert prepare_run_dir(cfg, parser) == run_dir


def test_folder_without_val_is_refused(tmp_path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        train_ddp.main(["--dataset", "folder", "--data_path", str(tmp_path)])
    assert exc.value.code == 2
    assert "must contain non-empty train/ and val/" in capsys.readouterr().err


def test_cli_exit_code_2():
    res = run([sys.executable, str(ROOT / "train_ddp.py"), "--mtu", "-3"], timeout=120)
    assert res.returncode == 2
    assert "--mtu must be >= 4" in res.stderr


# ------------------------------------------------------------------ runs
# The runs below share launches (tests/study/study_batch.py): every world-size-1 run the
# selected tests need is made in one process, every 2-rank run in one group of 2 processes,
# in the order RUNS declares them. Runs killed or stopped at a fault point are launches of
# their own (BEFORE), made first.


def script_flags(flags: str) -> Callable[[dict], list[str]]:
    """``python train_ddp.py`` (no torchrun: world size 1) with the small model."""
    return lambda ctx: [*SMALL, *flags.split()]


def folder_flags(flags: str, use_avg: bool = True) -> Callable[[dict], list[str]]:
    """World size 1 on the 18-image folder, small model, one round."""
    return lambda ctx: folder_cmd(ctx["data"], None, flags, use_avg)[2:]


def folder_cmd(image_folder: Path, out: Path | None, flags: str, use_avg: bool = True) -> list[str]:
    """``python train_ddp.py`` (world size 1) on the 18-image folder, small model, one round."""
    data = ["--dataset", "folder", "--data_path", str(image_folder), "--lab_round", "1"]
    avg = ["--use_avg"] if use_avg else []
    script = [sys.executable, str(ROOT / "train_ddp.py")]
    output = ["--output_dir", str(out)] if out is not None else []
    return [*script, *SMALL, *data, *avg, *flags.split(), *output]


def folder_run(image_folder: Path, out: Path, flags: str, env_extra: dict[str, str] | None = None):
    return subprocess.run(
        folder_cmd(image_folder, out, flags),
        env=env() | (env_extra or {}),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


TORCHRUN_FOLDER = (
    "--num_epochs 2 --batch_size 2 --accumulation_steps 2 --lab_round 2 "
    "--loss_rate 0.2 --worker_drop --use_avg --mtu 300"
)
KILL_COMMON = [
    *SMALL,
    *"--dataset digits --num_epochs 5 --batch_size 48 --accumulation_steps 2 --lab_round 1".split(),
    *["--loss_model", "gemodel 2% 30%", "--worker_drop", "--use_avg", "--mtu", "1500"],
]
KILL_MTU = [*KILL_COMMON, "--learning_rate", "0.005"]
FIDELITY_BASE = [
    *SMALL,
    *"--dataset digits --num_epochs 1 --max_steps 6 --batch_size 32 --accumulation_steps 1".split(),
    *"--lab_round 1 --use_avg --measure_fidelity --measure_drift 2".split(),
]
FIDELITY_LOSSY = ["--drop_point", "post", "--post_sync", "independent", "--use_zero", "--loss_rate", "0.2"]
SUM_FLAGS = (
    "--num_epochs 1 --max_steps 1 --batch_size 3 --accumulation_steps 1 --lab_round 1 --learning_rate 0.5"
)
KILL_BEFORE = "--num_epochs 3 --batch_size 6 --accumulation_steps 1 --loss_rate 0.2 --worker_drop"
WRITER = "--num_epochs 2 --batch_size 6 --accumulation_steps 1 --loss_rate 0.1"
DEFAULTS = (
    "--num_epochs 3 --batch_size 6 --accumulation_steps 1 --loss_rate 0.1 --use_zero --drop_point both "
    "--packetization tensor --tag probe --eval_every 2 --counts_transport separate"
)
AMP = (
    "--num_epochs 2 --batch_size 3 --accumulation_steps 1 --amp --amp_init_scale 1048576 "
    "--drop_point post --fill stale --loss_rate 0.3 --measure_fidelity"
)
ENCODING = (
    "--num_epochs 1 --batch_size 6 --accumulation_steps 1 --loss_rate 0.2 --worker_drop --use_avg "
    "--encoding hadamard --hadamard_block 1024 --wire_dtype fp16 --fec 8 1 --retransmit 1 --protect bias"
)
# mobilenet_v3_small: squeezenet collapses to uniform outputs on these images (zero
# gradients), where no rotation sign could show (resnet18 costs twice the time); fidelity
# makes every step's loss pattern visible
EXACT = (
    "--num_epochs 3 --batch_size 6 --accumulation_steps 1 --loss_rate 0.2 --worker_drop "
    "--model mobilenet_v3_small --measure_fidelity"
)
EXACT_OPTIONS = {
    "hadamard-fec-retx": (
        "--encoding hadamard --hadamard_block 1024 --wire_dtype bf16 --fec 4 1 --retransmit 1"
    ),
    "error-feedback": "--use_zero --error_feedback",
}


def _folder_data(ctx: dict) -> list[str]:
    return ["--dataset", "folder", "--data_path", str(ctx["data"])]


RUNS: dict[str, Run] = {
    # world size 1, one process
    "ws1": Run(
        1,
        script_flags(
            "--dataset digits --num_epochs 2 --max_steps 3 --batch_size 16 --accumulation_steps 1 "
            "--lab_round 1 --loss_rate 0.1 --use_avg"
        ),
    ),
    "diverge": Run(
        1,
        script_flags(
            "--dataset digits --num_epochs 3 --batch_size 64 --accumulation_steps 1 --lab_round 2 "
            "--learning_rate 1e12"
        ),
    ),
    **{
        f"acc{acc}": Run(
            1, folder_flags(f"--num_epochs 2 --batch_size 6 --accumulation_steps {acc} --loss_rate 0.1")
        )
        for acc in (3, 10)
    },
    "kill_before_resume": Run(
        1, folder_flags(KILL_BEFORE + " --resume"), out="kill_before_cut", after="kill_before_cut"
    ),
    "kill_before_ref": Run(1, folder_flags(KILL_BEFORE)),
    "amp": Run(1, folder_flags(AMP)),
    "writer_resume": Run(1, folder_flags(WRITER + " --resume"), out="writer", after="writer"),
    "defaults": Run(1, folder_flags(DEFAULTS, use_avg=False), snapshot=True),
    "defaults_again": Run(1, folder_flags(DEFAULTS, use_avg=False), out="defaults", needs=("defaults",)),
    "defaults_overwrite": Run(
        1,
        folder_flags(DEFAULTS + " --overwrite", use_avg=False),
        out="defaults",
        needs=("defaults", "defaults_again"),
    ),
    "stale": Run(
        1, folder_flags("--num_epochs 1 --batch_size 6 --accumulation_steps 1 --loss_rate 0.2 --fill stale")
    ),
    "fake": Run(
        1,
        script_flags(
            "--dataset fake --num_epochs 1 --max_steps 2 --batch_size 4 --accumulation_steps 1 --lab_round 1"
        ),
    ),
    "encoding": Run(1, folder_flags(ENCODING)),
    **{
        f"exact_{key}_{kind}": Run(
            1,
            folder_flags(f"{EXACT} {options}" + (" --resume" if kind == "resume" else "")),
            out=f"exact_{key}_cut" if kind == "resume" else None,
            after=f"exact_{key}_cut" if kind == "resume" else None,
        )
        for key, options in EXACT_OPTIONS.items()
        for kind in ("resume", "ref")
    },
    # 2 ranks, one group
    "torchrun_folder": Run(2, lambda ctx: [*SMALL, *_folder_data(ctx), *TORCHRUN_FOLDER.split()]),
    "kill_resume": Run(2, lambda ctx: [*KILL_MTU, "--resume"], out="kill_cut", after="kill_cut"),
    "kill_ref": Run(2, lambda ctx: KILL_MTU),
    "fidelity_lossy": Run(2, lambda ctx: [*FIDELITY_BASE, *FIDELITY_LOSSY]),
    "fidelity_resync": Run(2, lambda ctx: [*FIDELITY_BASE, *FIDELITY_LOSSY, "--resync", "2"]),
    "fidelity_clean": Run(2, lambda ctx: [*FIDELITY_BASE, "--loss_rate", "0"]),
    "sum": Run(2, lambda ctx: [*SMALL, *_folder_data(ctx), *SUM_FLAGS.split()]),
    "mean": Run(2, lambda ctx: [*SMALL, *_folder_data(ctx), *SUM_FLAGS.split(), "--use_avg"]),
}


def _kill_cut(study: SharedRuns) -> dict:
    """Rank 0 SIGKILLs itself right after epoch 3's row, before epoch 3's checkpoint (torchrun
    then stops rank 1); then, in this process, what --resume refuses in the cut folder."""
    cut_dir = study.out("kill_cut")
    killed = subprocess.run(
        torchrun([*KILL_MTU, "--output_dir", str(cut_dir)]),
        env=env() | {FAULT_ENV: "kill:after_metrics:3"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (metrics,) = cut_dir.glob("*/round0/metrics.csv")
    facts = {
        "code": killed.returncode,
        "epochs": [r["epoch"] for r in rows(metrics)],
        "checkpoint_epoch": torch.load(metrics.with_name("checkpoint.pt"), weights_only=True)["epoch"],
        "metrics": metrics,
        "refusals": [],
    }
    # a re-run without --resume is refused; a folder whose config.json differs from the flags
    # (one named before a setting was in the name) is refused by --resume, listing the difference
    saved = metrics.parent.parent / "config.json"
    text = saved.read_text()
    saved.write_text(text.replace('"learning_rate": 0.005', '"learning_rate": 0.01'))
    os.environ.update(WORLD_SIZE="2", RANK="0")  # name the 2-rank folder; errors come before any group
    try:
        for flags in (
            [*KILL_MTU, "--output_dir", str(cut_dir)],
            [*KILL_MTU, "--output_dir", str(cut_dir), "--resume"],
        ):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    train_ddp.main(flags)
                    code = None
                except SystemExit as exc:
                    code = exc.code
            facts["refusals"].append((code, err.getvalue()))
    finally:
        del os.environ["WORLD_SIZE"], os.environ["RANK"]
        saved.write_text(text)
    return facts


def _killed_alone(name: str, flags: str, fault: str) -> Callable[[SharedRuns], dict]:
    """A world-size-1 run on the folder that SIGKILLs itself at ``fault``."""

    def step(study: SharedRuns) -> dict:
        out = study.out(name)
        res = folder_run(study.context["data"], out, flags, {FAULT_ENV: fault})
        rd = only_dir(out) / "round0"
        return {
            "code": res.returncode,
            "epochs": [r["epoch"] for r in rows(rd / "metrics.csv")],
            "checkpoint": (rd / "checkpoint.pt").exists(),
        }

    return step


def _stopped_writer(study: SharedRuns) -> dict:
    """A writer stopped (SIGSTOP) after epoch 1, and a --resume beside it (in this process);
    then the writer killed."""
    out = study.out("writer")
    writer = subprocess.Popen(
        folder_cmd(study.context["data"], out, WRITER),
        env=env() | {FAULT_ENV: "stop:after_metrics:1"},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _, status = os.waitpid(writer.pid, os.WUNTRACED)  # returns once the writer has stopped
        facts = {"stopped": os.WIFSTOPPED(status), "pid": writer.pid}
        facts["lock_pid"] = json.loads((only_dir(out) / ".lock").read_text())["pid"]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            facts["code"] = train_ddp.main(folder_cmd(study.context["data"], out, WRITER + " --resume")[2:])
        facts["stderr"] = err.getvalue()
    finally:
        writer.kill()
        writer.wait()
    return facts


BEFORE: dict[str, Callable[[SharedRuns], Any]] = {
    "kill_cut": _kill_cut,
    "kill_before_cut": _killed_alone("kill_before_cut", KILL_BEFORE, "kill:after_metrics:1"),
    "writer": _stopped_writer,
    **{
        f"exact_{key}_cut": _killed_alone(f"exact_{key}_cut", f"{EXACT} {options}", "kill:after_metrics:2")
        for key, options in EXACT_OPTIONS.items()
    },
}


@pytest.fixture(scope="module")
def study(request, tmp_path_factory, image_folder) -> SharedRuns:
    root = tmp_path_factory.mktemp("study")
    return SharedRuns(root, {"data": image_folder}, RUNS, BEFORE, wanted_runs(request))


def finished(study: SharedRuns, name: str) -> Path:
    """Run ``name``'s folder, once it ended with exit 0."""
    res = study.result(name)
    assert res["code"] == 0, res["stdout"] + res["stderr"]
    return only_dir(study.out(name))


@uses("ws1", "diverge")
def test_world_size_one_without_torchrun_and_divergence(study):
    run_dir = finished(study, "ws1")
    assert run_dir.name.startswith(
        "digits_squeezenet1_1_w1_post-shared_rescale_mean_mtu300_acc1_random-10pct"
    )
    m = rows(run_dir / "round0" / "metrics.csv")
    assert [r["epoch"] for r in m] == ["1"] and m[0]["steps"] == "3"  # --max_steps ends the round
    assert float(m[0]["post_packets_sent"]) > 0 and m[0]["status"] == "ok"

    run_dir = finished(study, "diverge")
    for k in (0, 1):
        m = rows(run_dir / f"round{k}" / "metrics.csv")
        assert m[-1]["status"] == "diverged" and len(m) < 3
        assert json.loads((run_dir / f"round{k}" / "status.json").read_text())["status"] == "diverged"
    summary = rows(run_dir / "summary.csv")
    assert [r["status"] for r in summary[:2]] == ["diverged", "diverged"]


@uses("torchrun_folder")
def test_torchrun_folder_run_outputs(study):
    run_dir = finished(study, "torchrun_folder")
    assert run_dir.name == (
        "folder_squeezenet1_1_w2_worker_rescale_mean_mtu300_acc2_random-20pct_bucket25mb_ep2_bs2_r2"
    )
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["drop_point"] == "worker" and cfg["reduction"] == "mean"
    assert cfg["loss_rate"] == 0.2 and cfg["environment"]["torch"]
    per_step = set()
    lost = sent = 0
    for k in (0, 1):
        rd = run_dir / f"round{k}"
        for name in ("metrics.csv", "checkpoint.pt", "final.pt", "metrics.png", "status.json"):
            assert (rd / name).stat().st_size > 0, name
        m = rows(rd / "metrics.csv")
        assert [r["epoch"] for r in m] == ["1", "2"]
        # 18 train images / 2 ranks / batch 2 = 5 micro-batches per epoch -> 3 optimizer steps
        assert [int(r["steps"]) for r in m] == [3, 6]
        for r in m:
            # 6 validation images, each counted once over the 2 ranks' shards
            assert float(r["val_acc"]) * 6 == pytest.approx(round(float(r["val_acc"]) * 6), abs=1e-4)
            assert math.isfinite(float(r["train_loss"]))
            per_step.add(int(r["worker_packets_sent"]) / 3)
            sent += int(r["worker_packets_sent"])
            lost += int(r["worker_packets_lost"])
    # the hook fires once per optimizer step: packets per step are the same in every epoch,
    # 2 ranks x ceil(N / 75) packets of each bucket (mtu 300 B = 75 fp32 elements), the
    # buckets as DDP builds them (read by the layout tool)
    assert len(per_step) == 1
    layout = bucket_layout(build_model("squeezenet1_1", 3), 25, 300, example_input=torch.zeros(2, 3, 32, 32))
    assert per_step.pop() == 2 * layout["packets_per_step"]
    # packets carrying each parameter: from its element range in its bucket, x steps x ranks
    carried = {}
    for b in layout["buckets"]:
        start = 0
        for name, size in zip(b["param_names"], b["param_sizes"], strict=True):
            carried[name] = (start + size - 1) // 75 - start // 75 + 1
            start += size
    # different seeds per round (seed + k): different losses, and the hook was seeded so
    rounds_lost = [
        [r["worker_packets_lost"] for r in rows(run_dir / f"round{k}" / "metrics.csv")] for k in (0, 1)
    ]
    assert rounds_lost[0] != rounds_lost[1]
    assert [hook_config(run_dir / f"round{k}")["seed"] for k in (0, 1)] == [0, 1]
    lo, hi = binomial_interval(sent, 0.2, 0.999)
    assert lo <= lost <= hi
    # per-bucket and per-parameter accounting add up to the epoch's totals
    for k in (0, 1):
        rd = run_dir / f"round{k}"
        m = rows(rd / "metrics.csv")
        b = rows(rd / "buckets.csv")
        layers = rows(rd / "layers.csv")
        for r in m:
            mine = [x for x in b if x["epoch"] == r["epoch"]]
            names = {n for n, _ in build_model("squeezenet1_1", 3).named_parameters()}
            assert all(x["first_param"] in names and x["last_param"] in names for x in mine)
            # the buckets' parameters, in order, cover the model exactly once
            assert sum(int(x["params"]) for x in mine if x["drop_point"] == "worker") == len(names)
            assert sum(int(x["packets_sent"]) for x in mine) == int(r["worker_packets_sent"])
            assert sum(int(x["packets_lost"]) for x in mine) == int(r["worker_packets_lost"])
            per_param = [x for x in layers if x["epoch"] == r["epoch"]]
            assert {x["parameter"] for x in per_param} == {
                n for n, _ in build_model("squeezenet1_1", 3).named_parameters()
            }
            assert {x["parameter"]: int(x["packets_sent"]) for x in per_param} == {
                n: c * 3 * 2 for n, c in carried.items()
            }
            # a lost packet straddling two parameters counts for both: at least the epoch's total
            assert sum(int(x["packets_lost"]) for x in per_param) >= int(r["worker_packets_lost"])
    for name in ("summary.csv", "summary.png"):
        assert (run_dir / name).stat().st_size > 0
    summary = rows(run_dir / "summary.csv")
    assert [r["round"] for r in summary] == ["0", "1", "mean", "std"]


@uses("kill_cut", "kill_resume", "kill_ref")
def test_kill_then_resume_gives_each_epoch_once_and_same_numbers(study):
    # rank 0 SIGKILLs itself right after epoch 3's row, before epoch 3's checkpoint: torchrun
    # then stops rank 1; --resume must recompute epoch 3 from epoch 2's checkpoint
    cut = study.fact("kill_cut")
    assert cut["code"] != 0
    assert cut["epochs"] == ["1", "2", "3"]
    assert cut["checkpoint_epoch"] == 2
    metrics = cut["metrics"]

    # a re-run without --resume is refused; another learning rate is another folder; a folder
    # whose config.json differs from the flags (one named before a setting was in the name)
    # is refused by --resume, listing the difference (both tried on the cut folder, before
    # the resume)
    from lossy_hooks.study.sweeping.launch import run_dir_for

    assert run_dir_for([*KILL_COMMON, "--learning_rate", "0.01"], 2)[0].name != metrics.parent.parent.name
    for (code, err), msg in zip(
        cut["refusals"], ("pass --resume to continue", "learning_rate: saved 0.01, now 0.005"), strict=True
    ):
        assert code == 2
        assert msg in err

    finished(study, "kill_resume")
    resumed = rows(metrics)
    assert [r["epoch"] for r in resumed] == ["1", "2", "3", "4", "5"]

    ref_dir = finished(study, "kill_ref")
    reference = rows(ref_dir / "round0" / "metrics.csv")
    keys = ("steps", "train_loss", "val_loss", "val_acc", "worker_packets_sent", "worker_packets_lost")
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in reference]
    # the per-bucket and per-parameter breakdowns continue across the resume too
    for name in ("buckets.csv", "layers.csv"):
        assert rows(metrics.with_name(name)) == rows(ref_dir / "round0" / name), name


@uses("fidelity_lossy", "fidelity_resync", "fidelity_clean")
def test_fidelity_drift_and_resync_columns(study):
    """Independent post drops make replicas drift; --resync brings drift back to 0; at loss 0
    fidelity is exactly 1 and drift 0."""
    results = {
        name: rows(finished(study, f"fidelity_{name}") / "round0" / "metrics.csv")[0]
        for name in ("lossy", "resync", "clean")
    }
    lossy_row, resync_row, clean_row = results["lossy"], results["resync"], results["clean"]
    assert float(lossy_row["drift_max"]) > 1e-4 and float(lossy_row["drift_mean"]) > 0
    assert float(lossy_row["fidelity_cosine"]) < 0.99 and float(lossy_row["fidelity_rel_l2"]) > 0.05
    assert float(resync_row["drift_max"]) == 0.0  # measured right after each broadcast
    assert float(clean_row["drift_max"]) == 0.0
    assert float(clean_row["fidelity_cosine"]) == 1.0 and float(clean_row["fidelity_rel_l2"]) == 0.0


# ------------------------------------------------------------------ correctness of the script


@uses("acc3", "acc10")
def test_partial_accumulation_group_steps_with_its_mean(study):
    """18 images, batch 6: 3 micro-batches per epoch. With --accumulation_steps 10 the one
    group holds 3, so each step must use the mean of 3 micro-batch gradients: exactly the
    run with --accumulation_steps 3 (dividing by 10 stepped with 0.3x of it)."""
    runs = {acc: rows(finished(study, f"acc{acc}") / "round0" / "metrics.csv") for acc in (3, 10)}
    keys = ("steps", "train_loss", "val_loss", "val_acc", "post_packets_lost")
    assert [r["steps"] for r in runs[3]] == ["1", "2"]
    assert [{k: r[k] for k in keys} for r in runs[10]] == [{k: r[k] for k in keys} for r in runs[3]]


@uses("kill_before_cut", "kill_before_resume", "kill_before_ref")
def test_kill_before_the_first_checkpoint_then_resume_writes_each_epoch_once(study):
    """SIGKILL right after epoch 1's metrics row, before its checkpoint: --resume starts the
    round over and must not keep the dead run's rows (was epochs 1,1,2,3)."""
    cut = study.fact("kill_before_cut")
    assert cut["code"] == -signal.SIGKILL
    assert cut["epochs"] == ["1"] and not cut["checkpoint"]
    rd = finished(study, "kill_before_resume") / "round0"
    ref = finished(study, "kill_before_ref") / "round0"
    keys = ("epoch", "steps", "train_loss", "val_acc", "worker_packets_sent", "worker_packets_lost")
    resumed = [{k: r[k] for k in keys} for r in rows(rd / "metrics.csv")]
    assert [r["epoch"] for r in resumed] == ["1", "2", "3"]
    assert resumed == [{k: r[k] for k in keys} for r in rows(ref / "metrics.csv")]
    for name in ("buckets.csv", "layers.csv"):
        assert rows(rd / name) == rows(ref / name), name


@uses("amp")
def test_amp_overflow_steps_are_counted_and_kept_out_of_averages(study):
    """--amp with a loss scale of 2^20 overflows fp16 at first: GradScaler halves the scale on
    each skipped step, so skipped_steps = log2(2^20 / final scale). The stale fill never
    stores the overflowed packets, and loss and fidelity stay finite."""
    rd = finished(study, "amp") / "round0"
    m = rows(rd / "metrics.csv")
    skipped = sum(int(r["skipped_steps"]) for r in m)
    final_scale = float(torch.load(rd / "final.pt", weights_only=True)["scaler"]["scale"])
    assert skipped >= 1
    assert skipped == round(math.log2(2**20 / final_scale))
    assert sum(int(r["steps"]) for r in m[-1:]) > skipped  # some steps were taken
    for r in m:
        assert r["status"] == "ok"
        for k in ("train_loss", "train_acc", "fidelity_cosine", "fidelity_rel_l2", "val_loss"):
            assert math.isfinite(float(r[k])), (k, r[k])


@uses("writer", "writer_resume")
def test_resume_refused_while_another_process_writes_the_round(study):
    """A writer stopped (SIGSTOP) after epoch 1 still holds the configuration's lock: a
    --resume beside it is refused, naming its PID; once it is killed the lock is stale and
    --resume continues, each epoch written once, and the lock is gone at the end."""
    writer = study.fact("writer")
    assert writer["stopped"]
    assert writer["lock_pid"] == writer["pid"]
    assert writer["code"] == 2
    assert f"is being written by PID {writer['pid']}" in writer["stderr"]
    run_dir = finished(study, "writer_resume")
    assert [r["epoch"] for r in rows(run_dir / "round0" / "metrics.csv")] == ["1", "2"]
    assert not (run_dir / ".lock").exists()


# ------------------------------------------------------------------ every flag reaches the hook


def hook_config(round_dir: Path) -> dict:
    return torch.load(round_dir / "final.pt", weights_only=True)["ranks"][0]["hook"]["config"]


@uses("defaults", "defaults_again", "defaults_overwrite")
def test_original_defaults_and_flags_reach_the_hook(study):
    """Without --use_avg the reduction is a sum and --use_zero means zero fill, at both drop
    points; --packetization tensor sends one packet per parameter; --tag, --eval_every,
    --counts_transport and --overwrite do what they say; the same seed gives the same run."""
    finished(study, "defaults")
    run_dir = only_dir(study.snapshot("defaults"))  # the first run's folder, before --overwrite
    assert (
        run_dir.name == "folder_squeezenet1_1_w1_both-shared_zero_sum_pkt-tensor_acc1_random-10pct_bucket25mb"
        "_ep3_bs6_r1_counts-transport-separate_eval-every-2_probe"
    )
    cfg = json.loads((run_dir / "config.json").read_text())
    assert (cfg["fill"], cfg["reduction"], cfg["drop_point"]) == ("zero", "sum", "both")
    hook = hook_config(run_dir / "round0")
    assert {
        k: hook[k] for k in ("fill", "reduction", "drop_point", "packetization", "counts_transport", "seed")
    } == {
        "fill": "zero",
        "reduction": "sum",
        "drop_point": "both",
        "packetization": "tensor",
        "counts_transport": "separate",
        "seed": 0,
    }
    first = rows(run_dir / "round0" / "metrics.csv")
    assert [bool(r["val_acc"]) for r in first] == [False, True, True]  # every 2 epochs, and the last
    n_params = len(list(build_model("squeezenet1_1", 3).parameters()))
    for r in first:  # 18 images / batch 6 = 3 steps per epoch, one packet per parameter
        assert int(r["worker_packets_sent"]) == int(r["post_packets_sent"]) == 3 * n_params
    res = study.result("defaults_again")
    assert res["code"] == 2 and "--overwrite" in res["stderr"]
    again_dir = finished(study, "defaults_overwrite")
    assert again_dir.name == run_dir.name
    again = rows(again_dir / "round0" / "metrics.csv")
    keys = ("steps", "train_loss", "val_acc", "worker_packets_lost", "post_packets_lost")
    assert [{k: r[k] for k in keys} for r in again] == [{k: r[k] for k in keys} for r in first]


@uses("stale", "fake")
def test_stale_fill_and_fake_data_flags(study):
    hook = hook_config(finished(study, "stale") / "round0")
    assert (hook["fill"], hook["drop_point"], hook["reduction"]) == ("stale", "post", "mean")
    run_dir = finished(study, "fake")
    assert run_dir.name.startswith("fake_squeezenet1_1_w1_post-shared_rescale_sum_")
    assert rows(run_dir / "round0" / "metrics.csv")[0]["steps"] == "2"


@uses("sum", "mean")
def test_sum_reduction_steps_with_w_times_the_mean(study):
    """2 ranks, loss 0, one SGD step from the same initial model: the update with the sum
    (no --use_avg) is exactly twice the update with the mean (--use_avg)."""
    deltas = {}
    init = torch.cat([p.detach().flatten() for p in _initial_model().parameters()])
    names = [n for n, _ in _initial_model().named_parameters()]
    for name in ("sum", "mean"):
        model = torch.load(finished(study, name) / "round0" / "final.pt", weights_only=True)["model"]
        deltas[name] = torch.cat([model[n].flatten() for n in names]) - init
    ratio = float(deltas["sum"].norm() / deltas["mean"].norm())
    assert ratio == pytest.approx(2.0, rel=1e-3)
    assert float((deltas["sum"] - 2 * deltas["mean"]).norm() / deltas["sum"].norm()) < 1e-3


def _initial_model() -> torch.nn.Module:
    torch.manual_seed(0)  # round 0: seed 0, as train_ddp builds it
    return build_model("squeezenet1_1", 3)


@uses("encoding")
def test_encoding_and_protection_flags_reach_the_hook_and_the_csv(study):
    """One run with every option of issue 'encodings and protection': the folder is named by
    them, the hook gets them, metrics.csv counts parity, resent and protected packets."""
    run_dir = finished(study, "encoding")
    assert "_hadamard1024_wire-fp16_protect-bias_fec8-1_retx1_" in run_dir.name
    hook = hook_config(run_dir / "round0")
    assert (hook["encoding"], hook["wire_dtype"], hook["fec"], hook["retransmit"]) == (
        "hadamard",
        "fp16",
        [8, 1],
        1,
    )
    (row,) = rows(run_dir / "round0" / "metrics.csv")
    sent, extra = int(row["worker_packets_sent"]), int(row["worker_extra_packets"])
    assert extra >= math.ceil(sent / 8)  # a parity packet per 8 data packets, plus resends
    assert int(row["worker_protected_packets"]) > 0
    assert int(row["worker_recovered_fec"]) + int(row["worker_recovered_retransmit"]) > 0
    assert int(row["worker_bytes_sent"]) > 0


@pytest.mark.parametrize("options", list(EXACT_OPTIONS), ids=list(EXACT_OPTIONS))
@uses(*(f"exact_{key}_{kind}" for key in EXACT_OPTIONS for kind in ("cut", "resume", "ref")))
def test_resume_is_exact_with_encodings_and_protection(study, options):
    """Killed after epoch 2's row (checkpoint of epoch 1), resumed: every figure equals the
    uninterrupted run's (the rotation's sign stream, retry draws and residuals are saved)."""
    assert study.fact(f"exact_{options}_cut")["code"] == -signal.SIGKILL
    resumed = rows(finished(study, f"exact_{options}_resume") / "round0" / "metrics.csv")
    reference = rows(finished(study, f"exact_{options}_ref") / "round0" / "metrics.csv")
    drop = {"epoch_seconds", "images_per_s"}
    assert [r["epoch"] for r in resumed] == ["1", "2", "3"]
    assert len({r["train_loss"] for r in reference}) == 3  # gradients that move the model
    assert all(0 < float(r["fidelity_cosine"]) < 1 for r in reference)  # the loss shows in each epoch
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in reference
    ]

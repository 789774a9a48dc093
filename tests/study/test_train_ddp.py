"""train_ddp.py end to end: torchrun (Gloo, CPU, 2 ranks), world size 1, bad flags, kill/resume."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lossy_hooks.core.statistics import binomial_interval
from lossy_hooks.study.cli import resolve
from lossy_hooks.study.flags import build_parser
from lossy_hooks.study.run_control import FAULT_ENV
from lossy_hooks.study.workloads.models import build_model
from lossy_hooks.tools.bucket_layout import bucket_layout

from ..launch import ROOT, free_port

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


def run_script(flags: str, out: Path) -> subprocess.CompletedProcess:
    """``python train_ddp.py`` (no torchrun: world size 1) with the small model."""
    return run([sys.executable, str(ROOT / "train_ddp.py"), *SMALL, *flags.split(), "--output_dir", str(out)])


def test_world_size_one_without_torchrun_and_divergence(tmp_path):
    out = tmp_path / "runs"
    res = run_script(
        "--dataset digits --num_epochs 2 --max_steps 3 --batch_size 16 --accumulation_steps 1 "
        "--lab_round 1 --loss_rate 0.1 --use_avg",
        out,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    run_dir = only_dir(out)
    assert run_dir.name.startswith(
        "digits_squeezenet1_1_w1_post-shared_rescale_mean_mtu300_acc1_random-10pct"
    )
    m = rows(run_dir / "round0" / "metrics.csv")
    assert [r["epoch"] for r in m] == ["1"] and m[0]["steps"] == "3"  # --max_steps ends the round
    assert float(m[0]["post_packets_sent"]) > 0 and m[0]["status"] == "ok"

    bad = tmp_path / "bad"
    res = run_script(
        "--dataset digits --num_epochs 3 --batch_size 64 --accumulation_steps 1 --lab_round 2 "
        "--learning_rate 1e12",
        bad,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    run_dir = only_dir(bad)
    for k in (0, 1):
        m = rows(run_dir / f"round{k}" / "metrics.csv")
        assert m[-1]["status"] == "diverged" and len(m) < 3
        assert json.loads((run_dir / f"round{k}" / "status.json").read_text())["status"] == "diverged"
    summary = rows(run_dir / "summary.csv")
    assert [r["status"] for r in summary[:2]] == ["diverged", "diverged"]


def test_torchrun_folder_run_outputs(tmp_path, image_folder):
    out = tmp_path / "runs"
    args = [
        *SMALL,
        "--dataset",
        "folder",
        "--data_path",
        str(image_folder),
        "--num_epochs",
        "2",
        "--batch_size",
        "2",
        "--accumulation_steps",
        "2",
        "--lab_round",
        "2",
        "--loss_rate",
        "0.2",
        "--worker_drop",
        "--use_avg",
        "--mtu",
        "300",
        "--output_dir",
        str(out),
    ]
    res = run(torchrun(args))
    assert res.returncode == 0, res.stdout + res.stderr
    run_dir = only_dir(out)
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


def test_kill_then_resume_gives_each_epoch_once_and_same_numbers(tmp_path, capsys):
    common = [
        *SMALL,
        "--dataset",
        "digits",
        "--num_epochs",
        "5",
        "--batch_size",
        "48",
        "--accumulation_steps",
        "2",
        "--lab_round",
        "1",
        "--loss_model",
        "gemodel 2% 30%",
        "--worker_drop",
        "--use_avg",
        "--mtu",
        "1500",
    ]
    common_mtu = [*common, "--learning_rate", "0.005"]
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    # rank 0 SIGKILLs itself right after epoch 3's row, before epoch 3's checkpoint: torchrun
    # then stops rank 1; --resume must recompute epoch 3 from epoch 2's checkpoint
    killed = subprocess.run(
        torchrun([*common_mtu, "--output_dir", str(cut_dir)]),
        env=env() | {FAULT_ENV: "kill:after_metrics:3"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode != 0
    (metrics,) = cut_dir.glob("*/round0/metrics.csv")
    assert [r["epoch"] for r in rows(metrics)] == ["1", "2", "3"]
    assert torch.load(metrics.with_name("checkpoint.pt"), weights_only=True)["epoch"] == 2

    # a re-run without --resume is refused; another learning rate is another folder; a folder
    # whose config.json differs from the flags (one named before a setting was in the name)
    # is refused by --resume, listing the difference
    from lossy_hooks.study.sweeping.launch import run_dir_for

    assert run_dir_for([*common, "--learning_rate", "0.01"], 2)[0].name != metrics.parent.parent.name
    saved = metrics.parent.parent / "config.json"
    text = saved.read_text()
    saved.write_text(text.replace('"learning_rate": 0.005', '"learning_rate": 0.01'))
    os.environ.update(WORLD_SIZE="2", RANK="0")  # name the 2-rank folder; errors come before any group
    try:
        for flags, msg in (
            ([*common_mtu, "--output_dir", str(cut_dir)], "pass --resume to continue"),
            ([*common_mtu, "--output_dir", str(cut_dir), "--resume"], "learning_rate: saved 0.01, now 0.005"),
        ):
            with pytest.raises(SystemExit) as exc:
                train_ddp.main(flags)
            assert exc.value.code == 2
            assert msg in capsys.readouterr().err
    finally:
        del os.environ["WORLD_SIZE"], os.environ["RANK"]
        saved.write_text(text)

    res = run(torchrun([*common_mtu, "--output_dir", str(cut_dir), "--resume"]))
    assert res.returncode == 0, res.stdout + res.stderr
    resumed = rows(metrics)
    assert [r["epoch"] for r in resumed] == ["1", "2", "3", "4", "5"]

    res = run(torchrun([*common_mtu, "--output_dir", str(ref_dir)]))
    assert res.returncode == 0, res.stdout + res.stderr
    reference = rows(only_dir(ref_dir) / "round0" / "metrics.csv")
    keys = ("steps", "train_loss", "val_loss", "val_acc", "worker_packets_sent", "worker_packets_lost")
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in reference]
    # the per-bucket and per-parameter breakdowns continue across the resume too
    for name in ("buckets.csv", "layers.csv"):
        assert rows(metrics.with_name(name)) == rows(only_dir(ref_dir) / "round0" / name), name


def test_fidelity_drift_and_resync_columns(tmp_path):
    """Independent post drops make replicas drift; --resync brings drift back to 0; at loss 0
    fidelity is exactly 1 and drift 0."""
    base = [
        *SMALL,
        "--dataset",
        "digits",
        "--num_epochs",
        "1",
        "--max_steps",
        "6",
        "--batch_size",
        "32",
        "--accumulation_steps",
        "1",
        "--lab_round",
        "1",
        "--use_avg",
        "--measure_fidelity",
        "--measure_drift",
        "2",
    ]
    lossy = ["--drop_point", "post", "--post_sync", "independent", "--use_zero", "--loss_rate", "0.2"]
    results = {}
    for name, extra in (
        ("lossy", lossy),
        ("resync", [*lossy, "--resync", "2"]),
        ("clean", ["--loss_rate", "0"]),
    ):
        out = tmp_path / name
        res = run(torchrun([*base, *extra, "--output_dir", str(out)]))
        assert res.returncode == 0, res.stdout + res.stderr
        results[name] = rows(only_dir(out) / "round0" / "metrics.csv")[0]
    lossy_row, resync_row, clean_row = results["lossy"], results["resync"], results["clean"]
    assert float(lossy_row["drift_max"]) > 1e-4 and float(lossy_row["drift_mean"]) > 0
    assert float(lossy_row["fidelity_cosine"]) < 0.99 and float(lossy_row["fidelity_rel_l2"]) > 0.05
    assert float(resync_row["drift_max"]) == 0.0  # measured right after each broadcast
    assert float(clean_row["drift_max"]) == 0.0
    assert float(clean_row["fidelity_cosine"]) == 1.0 and float(clean_row["fidelity_rel_l2"]) == 0.0


# ------------------------------------------------------------------ correctness of the script


def folder_cmd(image_folder: Path, out: Path, flags: str, use_avg: bool = True) -> list[str]:
    """``python train_ddp.py`` (world size 1) on the 18-image folder, small model, one round."""
    data = ["--dataset", "folder", "--data_path", str(image_folder), "--lab_round", "1"]
    avg = ["--use_avg"] if use_avg else []
    script = [sys.executable, str(ROOT / "train_ddp.py")]
    return [*script, *SMALL, *data, *avg, *flags.split(), "--output_dir", str(out)]


def folder_run(image_folder: Path, out: Path, flags: str, env_extra: dict[str, str] | None = None):
    return subprocess.run(
        folder_cmd(image_folder, out, flags),
        env=env() | (env_extra or {}),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def test_partial_accumulation_group_steps_with_its_mean(tmp_path, image_folder):
    """18 images, batch 6: 3 micro-batches per epoch. With --accumulation_steps 10 the one
    group holds 3, so each step must use the mean of 3 micro-batch gradients: exactly the
    run with --accumulation_steps 3 (dividing by 10 stepped with 0.3x of it)."""
    runs = {}
    for acc in (3, 10):
        out = tmp_path / f"acc{acc}"
        res = folder_run(
            image_folder, out, f"--num_epochs 2 --batch_size 6 --accumulation_steps {acc} --loss_rate 0.1"
        )
        assert res.returncode == 0, res.stdout + res.stderr
        runs[acc] = rows(only_dir(out) / "round0" / "metrics.csv")
    keys = ("steps", "train_loss", "val_loss", "val_acc", "post_packets_lost")
    assert [r["steps"] for r in runs[3]] == ["1", "2"]
    assert [{k: r[k] for k in keys} for r in runs[10]] == [{k: r[k] for k in keys} for r in runs[3]]


def test_kill_before_the_first_checkpoint_then_resume_writes_each_epoch_once(tmp_path, image_folder):
    """SIGKILL right after epoch 1's metrics row, before its checkpoint: --resume starts the
    round over and must not keep the dead run's rows (was epochs 1,1,2,3)."""
    flags = "--num_epochs 3 --batch_size 6 --accumulation_steps 1 --loss_rate 0.2 --worker_drop"
    cut, ref = tmp_path / "cut", tmp_path / "ref"
    res = folder_run(image_folder, cut, flags, {FAULT_ENV: "kill:after_metrics:1"})
    assert res.returncode == -signal.SIGKILL
    rd = only_dir(cut) / "round0"
    assert [r["epoch"] for r in rows(rd / "metrics.csv")] == ["1"] and not (rd / "checkpoint.pt").exists()
    res = folder_run(image_folder, cut, flags + " --resume")
    assert res.returncode == 0, res.stdout + res.stderr
    res = folder_run(image_folder, ref, flags)
    assert res.returncode == 0, res.stdout + res.stderr
    keys = ("epoch", "steps", "train_loss", "val_acc", "worker_packets_sent", "worker_packets_lost")
    resumed = [{k: r[k] for k in keys} for r in rows(rd / "metrics.csv")]
    assert [r["epoch"] for r in resumed] == ["1", "2", "3"]
    assert resumed == [{k: r[k] for k in keys} for r in rows(only_dir(ref) / "round0" / "metrics.csv")]
    for name in ("buckets.csv", "layers.csv"):
        assert rows(rd / name) == rows(only_dir(ref) / "round0" / name), name


def test_amp_overflow_steps_are_counted_and_kept_out_of_averages(tmp_path, image_folder):
    """--amp with a loss scale of 2^20 overflows fp16 at first: GradScaler halves the scale on
    each skipped step, so skipped_steps = log2(2^20 / final scale). The stale fill never
    stores the overflowed packets, and loss and fidelity stay finite."""
    out = tmp_path / "amp"
    res = folder_run(
        image_folder,
        out,
        "--num_epochs 2 --batch_size 3 --accumulation_steps 1 --amp --amp_init_scale 1048576 "
        "--drop_point post --fill stale --loss_rate 0.3 --measure_fidelity",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    rd = only_dir(out) / "round0"
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


def test_resume_refused_while_another_process_writes_the_round(tmp_path, image_folder):
    """A writer stopped (SIGSTOP) after epoch 1 still holds the configuration's lock: a
    --resume beside it is refused, naming its PID; once it is killed the lock is stale and
    --resume continues, each epoch written once, and the lock is gone at the end."""
    flags = "--num_epochs 2 --batch_size 6 --accumulation_steps 1 --loss_rate 0.1"
    out = tmp_path / "runs"
    writer = subprocess.Popen(
        folder_cmd(image_folder, out, flags),
        env=env() | {FAULT_ENV: "stop:after_metrics:1"},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _, status = os.waitpid(writer.pid, os.WUNTRACED)  # returns once the writer has stopped
        assert os.WIFSTOPPED(status)
        run_dir = only_dir(out)
        assert json.loads((run_dir / ".lock").read_text())["pid"] == writer.pid
        res = folder_run(image_folder, out, flags + " --resume")
        assert res.returncode == 2
        assert f"is being written by PID {writer.pid}" in res.stderr
    finally:
        writer.kill()
        writer.wait()
    res = folder_run(image_folder, out, flags + " --resume")
    assert res.returncode == 0, res.stdout + res.stderr
    assert [r["epoch"] for r in rows(run_dir / "round0" / "metrics.csv")] == ["1", "2"]
    assert not (run_dir / ".lock").exists()


# ------------------------------------------------------------------ every flag reaches the hook


def hook_config(round_dir: Path) -> dict:
    return torch.load(round_dir / "final.pt", weights_only=True)["ranks"][0]["hook"]["config"]


def test_original_defaults_and_flags_reach_the_hook(tmp_path, image_folder):
    """Without --use_avg the reduction is a sum and --use_zero means zero fill, at both drop
    points; --packetization tensor sends one packet per parameter; --tag, --eval_every,
    --counts_transport and --overwrite do what they say; the same seed gives the same run."""
    flags = (
        "--num_epochs 3 --batch_size 6 --accumulation_steps 1 --loss_rate 0.1 --use_zero --drop_point both "
        "--packetization tensor --tag probe --eval_every 2 --counts_transport separate"
    )
    out = tmp_path / "runs"
    cmd = folder_cmd(image_folder, out, flags, use_avg=False)
    res = run(cmd)
    assert res.returncode == 0, res.stdout + res.stderr
    run_dir = only_dir(out)
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
    res = run(cmd)
    assert res.returncode == 2 and "--overwrite" in res.stderr
    res = run([*cmd, "--overwrite"])
    assert res.returncode == 0, res.stdout + res.stderr
    again = rows(run_dir / "round0" / "metrics.csv")
    keys = ("steps", "train_loss", "val_acc", "worker_packets_lost", "post_packets_lost")
    assert [{k: r[k] for k in keys} for r in again] == [{k: r[k] for k in keys} for r in first]


def test_stale_fill_and_fake_data_flags(tmp_path, image_folder):
    out = tmp_path / "stale"
    res = folder_run(
        image_folder, out, "--num_epochs 1 --batch_size 6 --accumulation_steps 1 --loss_rate 0.2 --fill stale"
    )
    assert res.returncode == 0, res.stdout + res.stderr
    hook = hook_config(only_dir(out) / "round0")
    assert (hook["fill"], hook["drop_point"], hook["reduction"]) == ("stale", "post", "mean")
    out = tmp_path / "fake"
    res = run_script(
        "--dataset fake --num_epochs 1 --max_steps 2 --batch_size 4 --accumulation_steps 1 --lab_round 1",
        out,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    run_dir = only_dir(out)
    assert run_dir.name.startswith("fake_squeezenet1_1_w1_post-shared_rescale_sum_")
    assert rows(run_dir / "round0" / "metrics.csv")[0]["steps"] == "2"


def test_sum_reduction_steps_with_w_times_the_mean(tmp_path, image_folder):
    """2 ranks, loss 0, one SGD step from the same initial model: the update with the sum
    (no --use_avg) is exactly twice the update with the mean (--use_avg)."""
    deltas = {}
    init = torch.cat([p.detach().flatten() for p in _initial_model().parameters()])
    for name, extra in (("sum", []), ("mean", ["--use_avg"])):
        out = tmp_path / name
        flags = "--num_epochs 1 --max_steps 1 --batch_size 3 --accumulation_steps 1 --lab_round 1"
        data = ["--dataset", "folder", "--data_path", str(image_folder)]
        args = [*SMALL, *data, *flags.split(), "--learning_rate", "0.5", *extra, "--output_dir", str(out)]
        res = run(torchrun(args))
        assert res.returncode == 0, res.stdout + res.stderr
        model = torch.load(only_dir(out) / "round0" / "final.pt", weights_only=True)["model"]
        names = [n for n, _ in _initial_model().named_parameters()]
        deltas[name] = torch.cat([model[n].flatten() for n in names]) - init
    ratio = float(deltas["sum"].norm() / deltas["mean"].norm())
    assert ratio == pytest.approx(2.0, rel=1e-3)
    assert float((deltas["sum"] - 2 * deltas["mean"]).norm() / deltas["sum"].norm()) < 1e-3


def _initial_model() -> torch.nn.Module:
    torch.manual_seed(0)  # round 0: seed 0, as train_ddp builds it
    return build_model("squeezenet1_1", 3)


def test_encoding_and_protection_flags_reach_the_hook_and_the_csv(tmp_path, image_folder):
    """One run with every option of issue 'encodings and protection': the folder is named by
    them, the hook gets them, metrics.csv counts parity, resent and protected packets."""
    out = tmp_path / "opts"
    flags = (
        "--num_epochs 1 --batch_size 6 --accumulation_steps 1 --loss_rate 0.2 --worker_drop --use_avg "
        "--encoding hadamard --hadamard_block 1024 --wire_dtype fp16 --fec 8 1 --retransmit 1 --protect bias"
    )
    res = folder_run(image_folder, out, flags)
    assert res.returncode == 0, res.stdout + res.stderr
    run_dir = only_dir(out)
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


@pytest.mark.parametrize(
    "options",
    [
        "--encoding hadamard --hadamard_block 1024 --wire_dtype bf16 --fec 4 1 --retransmit 1",
        "--use_zero --error_feedback",
    ],
    ids=["hadamard-fec-retx", "error-feedback"],
)
def test_resume_is_exact_with_encodings_and_protection(tmp_path, image_folder, options):
    """Killed after epoch 2's row (checkpoint of epoch 1), resumed: every figure equals the
    uninterrupted run's (the rotation's sign stream, retry draws and residuals are saved)."""
    # resnet18: squeezenet collapses to uniform outputs on these images (zero gradients),
    # where no rotation sign could show; fidelity makes every step's loss pattern visible
    flags = (
        "--num_epochs 3 --batch_size 6 --accumulation_steps 1 --loss_rate 0.2 --worker_drop "
        f"--model resnet18 --measure_fidelity {options}"
    )
    cut, ref = tmp_path / "cut", tmp_path / "ref"
    res = folder_run(image_folder, cut, flags, {FAULT_ENV: "kill:after_metrics:2"})
    assert res.returncode == -signal.SIGKILL
    res = folder_run(image_folder, cut, flags + " --resume")
    assert res.returncode == 0, res.stdout + res.stderr
    res = folder_run(image_folder, ref, flags)
    assert res.returncode == 0, res.stdout + res.stderr
    resumed = rows(only_dir(cut) / "round0" / "metrics.csv")
    reference = rows(only_dir(ref) / "round0" / "metrics.csv")
    drop = {"epoch_seconds", "images_per_s"}
    assert [r["epoch"] for r in resumed] == ["1", "2", "3"]
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in reference
    ]

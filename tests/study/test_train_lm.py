"""The language-model workload: the byte-level corpus, the GPT, and train_ddp.py with
``--strategy fsdp`` (checks, metrics, exact resume) and ``--strategy ddp``."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import train_ddp
from lossy_hooks.core.statistics import binomial_interval
from lossy_hooks.study.run_control import FAULT_ENV
from lossy_hooks.study.workloads.gpt import GPT_CONFIGS, build_gpt
from lossy_hooks.study.workloads.text_data import TokenWindows, corpus_files, load_corpus

from ..launch import ROOT
from .study_batch import Run, SharedRuns, uses, wanted_runs
from .test_train_ddp import env, only_dir, rows, torchrun

WORDS = "the quick brown fox jumps over a lazy dog while packets go missing on the wire".split()


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """20 generated text files (~2 KB each) and one binary file the corpus must skip."""
    root = tmp_path_factory.mktemp("text")
    g = torch.Generator().manual_seed(0)
    for i in range(20):
        idx = torch.randint(0, len(WORDS), (400,), generator=g).tolist()
        (root / f"f{i:02d}.txt").write_text(" ".join(WORDS[j] for j in idx) + "\n")
    (root / "blob.bin").write_bytes(bytes([0xFF, 0xFE, 0x00, 0x80]) * 100)
    return root


# ------------------------------------------------------------------ data and model


def test_corpus_split_by_file_and_windows(text_folder):
    files = corpus_files(str(text_folder))
    assert [f.name for f in files][:3] == ["blob.bin", "f00.txt", "f01.txt"]  # sorted
    train, val, name = load_corpus(str(text_folder), 10**9)
    texts = [(text_folder / f"f{i:02d}.txt").read_bytes() for i in range(20)]  # blob.bin skipped
    assert bytes(val.tolist()) == texts[9] + b"\n" + texts[19]  # every 10th file
    assert len(train) == sum(len(t) for i, t in enumerate(texts) if i % 10 != 9) + 17  # 17 joins
    assert name == text_folder.name
    # 3000 bytes: the first file and the start of the second; under 10 files the last is validation
    capped_train, capped_val, _ = load_corpus(str(text_folder), 3000)
    assert len(capped_train) == len(texts[0]) and len(capped_train) + len(capped_val) == 3000
    w = TokenWindows(val, 64)
    assert len(w) == (len(val) - 1) // 64
    x, y = w[3]
    assert x.dtype == torch.long and torch.equal(x[1:], y[:-1]) and x[0] == val[3 * 64]
    one = text_folder / "f00.txt"
    t1, v1, _ = load_corpus(str(one), 10**9)
    assert len(t1) == len(texts[0]) * 9 // 10 and len(t1) + len(v1) == len(texts[0])


def test_default_corpus_is_the_standard_library():
    train, val, name = load_corpus(None, 2**18)
    assert name == f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}"
    assert len(train) > 0 and len(val) > 0 and len(train) + len(val) <= 2**18 + 64
    assert b"def " in bytes(train[:20000].tolist())


def test_gpt_shapes_and_causality():
    torch.manual_seed(0)
    model = build_gpt("gpt-tiny").eval()
    cfg = GPT_CONFIGS["gpt-tiny"]
    x = torch.randint(0, 256, (2, cfg.block_size))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, cfg.block_size, 256)
    y = x.clone()
    y[:, 40] = (y[:, 40] + 1) % 256  # a later token cannot change earlier predictions
    with torch.no_grad():
        out2 = model(y)
    assert torch.equal(out[:, :40], out2[:, :40]) and not torch.equal(out[:, 40:], out2[:, 40:])
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, cfg.block_size + 1, dtype=torch.long))
    # initial loss ~ ln 256: the model starts uniform over bytes
    loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), x.flatten())
    assert abs(loss.item() - math.log(256)) < 0.1


# ------------------------------------------------------------------ flags


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--strategy", "fsdp", "--amp"], "--amp: DDP only, not with --strategy fsdp"),
        (["--strategy", "fsdp", "--bucket_cap_mb", "5"], "--bucket_cap_mb: DDP only"),
        (["--strategy", "fsdp", "--resync", "4"], "--resync: DDP only"),
        (["--all_gather_loss_rate", "0.1"], "--all_gather_loss_rate needs --strategy fsdp"),
        (["--strategy", "fsdp", "--all_gather_loss_rate", "1"], "--all_gather_loss_rate must be in [0, 1)"),
        (["--strategy", "fsdp", "--protect", "head"], "protect='head' is not supported under FSDP"),
        (["--strategy", "fsdp", "--fec", "8", "1"], "fec=[8, 1] is not supported under FSDP"),
        (["--model", "gpt-tiny", "--dataset", "digits"], "is a language model: --dataset text"),
        (["--model", "squeezenet1_1", "--dataset", "text"], "--dataset text needs a language model"),
        (["--model", "gpt-tiny", "--corpus_mb", "0"], "--corpus_mb must be > 0"),
        (["--model", "gpt-tiny", "--data_path", "/nonexistent"], "no such text file or folder"),
        (["--strategy", "ring"], "invalid choice: 'ring'"),
    ],
)
def test_bad_flags_exit_2_with_message(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train_ddp.main(["--model", "gpt-tiny", *flags, "--output_dir", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_an_older_torch_without_fsdp2_collectives_refuses_only_fsdp(tmp_path):
    """On a torch without FSDP2's custom-collective API (simulated: its ReduceScatter and
    AllGather classes removed) train_ddp.py still starts and parses --strategy ddp, and
    --strategy fsdp exits 2 naming the version it needs, before any work. One interpreter,
    three command lines (each exit and its stderr recorded)."""
    out = tmp_path / "runs"
    runs = {
        "help": ["--help"],
        "ddp": ["--strategy", "ddp", "--fill", "stale", "--drop_point", "worker"],  # the last check
        "fsdp": ["--strategy", "fsdp", "--model", "gpt-tiny"],
    }
    code = (
        "import contextlib, io, json, sys\n"
        "import torch.distributed.fsdp._fully_shard._fsdp_api as api\n"
        "del api.ReduceScatter, api.AllGather  # the extension points torch 2.10 added\n"
        "sys.path.insert(0, '.')\n"
        "import train_ddp\n"
        "res = {}\n"
        f"for name, argv in {runs!r}.items():\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        f"            code = train_ddp.main([*argv, '--output_dir', {str(out)!r}])\n"
        "        except SystemExit as e:\n"
        "            code = e.code\n"
        "    res[name] = [code, err.getvalue()]\n"
        "print(json.dumps(res))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["help"][0] == 0
    assert res["ddp"][0] == 2 and "fill='stale' needs drop_point='post'" in res["ddp"][1]
    assert "2.10" not in res["ddp"][1]
    code, err = res["fsdp"]
    assert code == 2 and "--strategy fsdp needs torch >= 2.10" in err and "--strategy ddp works" in err
    assert not out.exists()


# ------------------------------------------------------------------ runs

LM = (
    "--model gpt-tiny --optimizer adamw --learning_rate 0.003 --batch_size 8 --accumulation_steps 2 "
    "--use_avg --mtu 1500 --lab_round 1 --workers 0"
)


def lm_flags(flags: str) -> Callable[[dict], list[str]]:
    return lambda ctx: [*LM.split(), "--data_path", str(ctx["text"]), *flags.split()]


FSDP_LOSSY = "--strategy fsdp --num_epochs 3 --loss_rate 0.1 --worker_drop --all_gather_loss_rate 0.05"
FSDP_LOSSY += " --measure_fidelity"
LOSSLESS = "--num_epochs 1 --max_steps 12"

# The 2-rank runs share one group of 2 processes (tests/study/study_batch.py); the run killed
# at a fault point is a torchrun launch of its own, made first.
RUNS = {
    "fsdp_resume": Run(2, lm_flags(FSDP_LOSSY + " --resume"), out="fsdp_cut", after="fsdp_cut"),
    "fsdp_ref": Run(2, lm_flags(FSDP_LOSSY)),
    "lossless_ddp": Run(2, lm_flags(LOSSLESS)),
    "lossless_fsdp": Run(2, lm_flags(LOSSLESS + " --strategy fsdp --measure_fidelity")),
}


def _fsdp_cut(study: SharedRuns) -> dict:
    """gpt-tiny under FSDP2, rank 0 killed (SIGKILL) after writing epoch 2's row."""
    out = study.out("fsdp_cut")
    cmd = torchrun([*lm_flags(FSDP_LOSSY)(study.context), "--output_dir", str(out)])
    env_cut = env() | {FAULT_ENV: "kill:after_metrics:2"}
    res = subprocess.run(cmd, env=env_cut, capture_output=True, text=True, timeout=600, cwd=ROOT)
    return {"code": res.returncode, "output": res.stdout + res.stderr}


@pytest.fixture(scope="module")
def study(request, tmp_path_factory, text_folder) -> SharedRuns:
    root = tmp_path_factory.mktemp("lm")
    return SharedRuns(root, {"text": text_folder}, RUNS, {"fsdp_cut": _fsdp_cut}, wanted_runs(request))


def finished(study: SharedRuns, name: str) -> Path:
    res = study.result(name)
    assert res["code"] == 0, res["stdout"] + res["stderr"]
    return only_dir(study.out(name))


@uses("fsdp_cut", "fsdp_resume", "fsdp_ref")
def test_fsdp_language_model_run_resumes_exactly(study):
    """gpt-tiny under FSDP2 with 10% worker loss (rescale) and 5% all-gather loss (stale):
    killed after epoch 2's row, resumed: every figure equals the uninterrupted run's."""
    cut = study.fact("fsdp_cut")
    # rank 0 killed (SIGKILL) after writing epoch 2's row; torchrun stops the other rank
    assert cut["code"] != 0 and "Signal 9 (SIGKILL)" in cut["output"]
    resumed_dir = finished(study, "fsdp_resume")
    run_dir = finished(study, "fsdp_ref")
    assert run_dir.name.startswith("text_gpt-tiny_w2_worker_rescale_mean_mtu1500_acc2_random-10pct")
    assert "_fsdp_ag0p05-stale_adamw_" in run_dir.name
    resumed = rows(resumed_dir / "round0" / "metrics.csv")
    reference = rows(run_dir / "round0" / "metrics.csv")
    drop = {"epoch_seconds", "images_per_s"}
    assert [r["epoch"] for r in resumed] == ["1", "2", "3"]
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in reference
    ]
    for r in reference:
        assert float(r["val_perplexity"]) == pytest.approx(math.exp(float(r["val_loss"])), rel=1e-5)
        # the whole reduced gradient (every rank's shard) against the lossless reduce-scatter's
        assert 0.5 < float(r["fidelity_cosine"]) < 1.0 and float(r["fidelity_rel_l2"]) > 0.0
    assert float(reference[-1]["val_loss"]) < float(reference[0]["train_loss"])  # it learns
    # one reduce-scatter round per optimizer step (accumulation runs without gradient sync):
    # gpt-tiny's 3 units at W=2 are 67 + 67 + 50 packets per rank (bucket_layout --strategy fsdp)
    steps = [int(r["steps"]) for r in reference]
    per_epoch = [b - a for a, b in zip([0, *steps], steps, strict=False)]
    assert [int(r["worker_packets_sent"]) for r in reference] == [2 * 184 * k for k in per_epoch]
    for point, p in (("worker", 0.1), ("gather", 0.05)):
        sent = sum(int(r[f"{point}_packets_sent"]) for r in reference)
        lost = sum(int(r[f"{point}_packets_lost"]) for r in reference)
        lo, hi = binomial_interval(sent, p, 0.999)
        assert sent > 0 and lo <= lost <= hi, (point, sent, lost)
    buckets = rows(run_dir / "round0" / "buckets.csv")
    assert {b["drop_point"] for b in buckets} == {"worker", "gather"}
    assert {b["first_param"] for b in buckets} == {"(root)", "blocks.0", "blocks.1"}
    summary = rows(run_dir / "summary.csv")
    assert float(summary[0]["final_val_perplexity"]) == pytest.approx(float(reference[-1]["val_perplexity"]))


@uses("lossless_ddp", "lossless_fsdp")
def test_lossless_fsdp_and_ddp_train_the_same_model(study):
    """Loss 0: FSDP2 (sharded AdamW) and DDP compute the same steps, up to the order of the
    floating-point sums."""
    a = rows(finished(study, "lossless_ddp") / "round0" / "metrics.csv")[0]
    b = rows(finished(study, "lossless_fsdp") / "round0" / "metrics.csv")[0]
    assert a["steps"] == b["steps"] == "12"
    for key in ("train_loss", "val_loss"):
        assert float(a[key]) == pytest.approx(float(b[key]), rel=2e-4), key
    assert a["worker_packets_sent"] == "" and int(a["post_packets_sent"]) > 0  # the post point
    assert int(b["post_packets_sent"]) > 0 and b["gather_packets_sent"] == ""
    # loss 0: the lossy reduce-scatter is the lossless one, bit for bit
    assert float(b["fidelity_cosine"]) == 1.0 and float(b["fidelity_rel_l2"]) == 0.0


# ------------------------------------------------------------------ plots and compare


def _fake_run(root, name: str, cfg: dict, perplexities: list[list[float]]) -> None:
    d = root / name
    base = {
        "dataset": "text",
        "model": "gpt-tiny",
        "world_size": 2,
        "drop_point": "worker",
        "post_sync": "shared",
        "fill": "rescale",
        "reduction": "mean",
        "packetization": "mtu",
        "mtu": 1500,
        "accumulation_steps": 1,
        "bucket_cap_mb": 25.0,
        "loss_model": "random 10%",
        "long_run_loss_rate": 0.1,
        "lab_round": len(perplexities),
        "optimizer": "adamw",
    }
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(base | cfg))
    for k, ppl in enumerate(perplexities):
        (d / f"round{k}").mkdir()
        lines = ["epoch,train_loss,val_loss,train_acc,val_acc,val_perplexity,epoch_seconds,status"]
        lines += [f"{e + 1},2,{math.log(p)},0.4,0.45,{p},1.0,ok" for e, p in enumerate(ppl)]
        (d / f"round{k}" / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_compare_reports_perplexity_and_keeps_strategies_apart(tmp_path):
    from lossy_hooks.tools.compare import main as compare_main

    runs = tmp_path / "runs"
    _fake_run(runs, "ddp", {}, [[9.0, 7.0], [9.5, 7.2]])
    _fake_run(runs, "fsdp", {"strategy": "fsdp"}, [[9.1, 7.4], [9.6, 7.6]])
    _fake_run(
        runs, "fsdp0", {"strategy": "fsdp", "loss_model": "random 0%", "long_run_loss_rate": 0.0}, [[8, 6]]
    )
    assert compare_main([str(runs), "--out", str(tmp_path / "cmp")]) == 0
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "cmp" / "compare.csv"))}
    assert rows["ddp"]["options"] == "adamw" and rows["fsdp"]["options"] == "fsdp+adamw"  # two groups
    assert float(rows["ddp"]["final_ppl_mean"]) == pytest.approx(7.1)
    assert float(rows["fsdp"]["final_ppl_std"]) == pytest.approx(math.sqrt(0.02), rel=1e-5)  # 6 digits
    assert float(rows["fsdp"]["best_ppl_mean"]) == pytest.approx(7.5)
    assert (tmp_path / "cmp" / "perplexity_vs_loss_rate.png").stat().st_size > 10_000


def test_round_plot_has_a_perplexity_panel_for_language_models(tmp_path):
    from PIL import Image

    from lossy_hooks.study.plotting import plot_round

    runs = tmp_path / "runs"
    _fake_run(runs, "lm", {}, [[9.0, 7.0]])
    metrics = runs / "lm" / "round0" / "metrics.csv"
    plot_round(metrics, tmp_path / "lm.png", "lm")
    text = metrics.read_text().replace(",9.0,", ",,").replace(",7.0,", ",,")  # no perplexity
    (tmp_path / "img.csv").write_text(text)
    plot_round(tmp_path / "img.csv", tmp_path / "img.png", "img")
    assert Image.open(tmp_path / "lm.png").width == 3 * Image.open(tmp_path / "img.png").width // 2

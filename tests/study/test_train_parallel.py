"""Model parallelism in the study script (issue 43): ``--tp`` (with ``--sequence_parallel``),
``--pp`` and ``--ep``, composed, under DDP and FSDP2. Loss 0 trains the model of a run without
them, ``--traffic_loss TYPE=10%`` moves only that type's
counters, a kill and ``--resume`` continue the exact loss sequences, and the refusals of
``--tp``, ``--pp``, ``--ep``, ``--traffic_loss`` and ``--traffic_fill`` (before any work).

The runs: a group at W=1 (the references without model parallelism), one of 2 processes
(dp=1 x tp=2, pp=2 or ep=2) and one of 4 (the composed layouts tp x pp and tp x ep, the
expert replicas) holding the others (tests/study/study_batch.py); each run killed at a fault
point (tp x pp at W = 4, FSDP pp at W = 4, FSDP ep at W = 2) is a torchrun launch of its own,
made first."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import train_ddp
from lossy_hooks.core.statistics import binomial_interval
from lossy_hooks.study.run_control import FAULT_ENV
from lossy_hooks.study.traffic import parse_traffic_loss

from ..launch import ROOT
from .study_batch import Run, SharedRuns, uses, wanted_runs
from .test_train_ddp import env, only_dir, rows, torchrun

LM = (
    "--model gpt-tiny --optimizer adamw --learning_rate 0.003 --batch_size 8 --accumulation_steps 2 "
    "--use_avg --mtu 1500 --lab_round 1 --workers 0 --corpus_mb 0.01 --num_epochs 3"
)
DP_LOSS = "--tp 2 --loss_rate 0.1 --worker_drop"
TP_LOSS = DP_LOSS + " --traffic_loss tp=10%"
# W = 4, composed: tp (sequence-parallel) and pp traffic lossy (zero fill) under 1F1B, killed
# and resumed
PP_LOSS = "--tp 2 --pp 2 --sequence_parallel --traffic_loss tp=5%,pp=10% --pp_schedule 1f1b"
# W = 2, FSDP2 over dp = 2 with the experts over ep = 2, ep lossy (stale), killed and resumed
EP_LOSS = "--model moe-tiny --ep 2 --strategy fsdp --traffic_loss ep=10% --traffic_fill stale"
# W = 4, FSDP2 over dp = 2 per stage x pp = 2: pp, dp gradients and all-gathers lossy
PPF_LOSS = "--pp 2 --strategy fsdp --traffic_loss pp=10% --loss_rate 0.05 --worker_drop"
PPF_LOSS += " --all_gather_loss_rate 0.05"
CUTS = {"pp_cut": (4, PP_LOSS), "ep_cut": (2, EP_LOSS), "ppf_cut": (4, PPF_LOSS)}  # name: (world, flags)
KINDS = ("all_gather", "reduce_scatter", "all_reduce")
TP_PP_FSDP = "--tp 2 --pp 2 --strategy fsdp --sequence_parallel --pp_schedule 1f1b"


def flags(text: str) -> Callable[[dict], list[str]]:
    return lambda ctx: [*LM.split(), *text.split()]


RUNS = {
    "base": Run(1, flags("--num_epochs 2")),
    # the pipeline leaves the epoch's short last group out: 8 of 9 steps, one epoch
    "base_steps8": Run(1, flags("--num_epochs 1 --max_steps 8")),
    "tp0": Run(2, flags("--tp 2 --num_epochs 2")),
    "tp0_fsdp": Run(2, flags("--tp 2 --num_epochs 2 --strategy fsdp")),
    "sp0": Run(2, flags("--tp 2 --sequence_parallel --num_epochs 2")),
    "dp_loss": Run(2, flags(DP_LOSS)),
    "tp_loss": Run(2, flags(TP_LOSS)),
    "pp0": Run(2, flags("--pp 2 --num_epochs 1")),
    "pp0_1f1b": Run(2, flags("--pp 2 --num_epochs 1 --pp_schedule 1f1b")),
    "moe": Run(2, flags("--model moe-tiny --num_epochs 2")),
    "ep0": Run(2, flags("--model moe-tiny --ep 2 --num_epochs 2")),
    "ep0_fsdp": Run(2, flags("--model moe-tiny --ep 2 --num_epochs 2 --strategy fsdp")),
    # dp = 2 without pipelining, the 4 steps of a 2-stage pipeline's epoch (short groups dropped)
    "dp2_steps4": Run(2, flags("--num_epochs 1 --max_steps 4")),
    "moe_steps4": Run(2, flags("--model moe-tiny --num_epochs 1 --max_steps 4")),
    "ep_loss": Run(2, flags(EP_LOSS)),
    "ep_resume": Run(2, flags(EP_LOSS + " --resume"), out="ep_cut", after="ep_cut"),
    # W = 4, ep = 2: two ranks hold each expert (their gradients summed outside DDP)
    "moe_w4": Run(4, flags("--model moe-tiny --num_epochs 1")),
    "ep_w4": Run(4, flags("--model moe-tiny --ep 2 --num_epochs 1")),
    # composed on one mesh, W = 4: dp=1 x pp=2 x tp=2; dp=2 (ep=2 within it) x tp=2
    "tp_pp": Run(4, flags("--tp 2 --pp 2 --num_epochs 1")),
    "tp_pp_loss": Run(4, flags("--tp 2 --pp 2 --num_epochs 1 --traffic_loss pp=10% --pp_schedule 1f1b")),
    "tp_ep": Run(4, flags("--model moe-tiny --tp 2 --ep 2 --num_epochs 2")),
    "pp_ep": Run(4, flags("--model moe-tiny --pp 2 --ep 2 --num_epochs 1")),
    # under FSDP2: tp x pp with sequence parallelism and 1F1B (dp = 1); pp x ep of an MoE model
    "tp_pp_fsdp": Run(4, flags(TP_PP_FSDP + " --num_epochs 1")),
    "pp_ep_fsdp": Run(4, flags("--model moe-tiny --pp 2 --ep 2 --num_epochs 1 --strategy fsdp")),
    "pp_loss": Run(4, flags(PP_LOSS)),
    "pp_resume": Run(4, flags(PP_LOSS + " --resume"), out="pp_cut", after="pp_cut"),
    "pp_fsdp": Run(4, flags("--pp 2 --strategy fsdp --num_epochs 1")),
    "ppf_loss": Run(4, flags(PPF_LOSS)),
    "ppf_resume": Run(4, flags(PPF_LOSS + " --resume"), out="ppf_cut", after="ppf_cut"),
}


def _cut(name: str) -> Callable[[SharedRuns], dict]:
    """The lossy run of ``name``'s type, rank 0 killed (SIGKILL) after writing epoch 2's row
    (the checkpoint holds epoch 1)."""

    def run(study: SharedRuns) -> dict:
        world, text = CUTS[name]
        cmd = torchrun([*flags(text)(study.context), "--output_dir", str(study.out(name))], nproc=world)
        cut_env = env() | {FAULT_ENV: "kill:after_metrics:2"}
        res = subprocess.run(cmd, env=cut_env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        return {"code": res.returncode, "output": res.stdout + res.stderr}

    return run


@pytest.fixture(scope="module")
def study(request, tmp_path_factory) -> SharedRuns:
    cuts = {name: _cut(name) for name in CUTS}
    return SharedRuns(tmp_path_factory.mktemp("parallel"), {}, RUNS, cuts, wanted_runs(request))


def metrics(study: SharedRuns, name: str) -> tuple[Path, list[dict[str, str]]]:
    res = study.result(name)
    assert res["code"] == 0, res["stdout"] + res["stderr"]
    run_dir = only_dir(study.out(name))
    return run_dir, rows(run_dir / "round0" / "metrics.csv")


@uses("base", "tp0", "tp0_fsdp", "sp0")
def test_lossless_tp_trains_the_model_of_a_run_without_tp(study):
    """Loss 0, dp=1: tp=2 (DDP or FSDP2 over the dp mesh; DDP with sequence parallelism)
    equals the one-rank run up to the order of the tp sums (rel 1e-4 on the losses and
    perplexity: measured equal to the 6 digits metrics.csv keeps; accuracies within 2e-3);
    tp packets counted, none lost."""
    base_dir, base = metrics(study, "base")
    assert "_tp" not in base_dir.name and "tl-" not in base_dir.name  # the names of before
    for name in ("tp0", "tp0_fsdp", "sp0"):
        run_dir, tp = metrics(study, name)
        assert ("_tp2-sp_" if name == "sp0" else "_tp2_") in run_dir.name and "tl-" not in run_dir.name
        assert [r["steps"] for r in tp] == [r["steps"] for r in base]
        for a, b in zip(base, tp, strict=True):
            for key in ("train_loss", "val_loss", "val_perplexity"):
                assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4), (name, key)
            for key in ("train_acc", "val_acc"):
                assert float(b[key]) == pytest.approx(float(a[key]), abs=2e-3), (name, key)
            assert int(b["tp_packets_sent"]) > 0 and b["tp_packets_lost"] == "0"
            assert a["tp_packets_sent"] == ""  # no tp: no column
        assert float(tp[-1]["val_loss"]) < float(tp[0]["train_loss"])  # it learns


@uses("dp_loss", "tp_loss")
def test_traffic_loss_moves_only_the_tp_counters(study):
    """Same seed, 10% dp worker loss in both; tp=10% in one: the dp columns are equal, the tp
    packets sent too, and the tp packets lost are in the 99.9% binomial interval of 10%."""
    dp_dir, dp_rows = metrics(study, "dp_loss")
    tp_dir, tp_rows = metrics(study, "tp_loss")
    assert tp_dir.name == dp_dir.name.replace("_tp2_", "_tp2_tl-tp-random-10pct_")
    dp_columns = ("worker_packets_sent", "worker_packets_lost", "effective_loss_rate", "tp_packets_sent")
    for a, b in zip(dp_rows, tp_rows, strict=True):
        assert {k: a[k] for k in dp_columns} == {k: b[k] for k in dp_columns}
        assert a["tp_packets_lost"] == "0" and int(a["worker_packets_lost"]) > 0
    sent = sum(int(r["tp_packets_sent"]) for r in tp_rows)
    lost = sum(int(r["tp_packets_lost"]) for r in tp_rows)
    lo, hi = binomial_interval(sent, 0.1, 0.999)
    assert lo <= lost <= hi, (sent, lost)
    assert float(tp_rows[-1]["tp_loss_rate"]) == pytest.approx(
        int(tp_rows[-1]["tp_packets_lost"]) / int(tp_rows[-1]["tp_packets_sent"]), rel=1e-5
    )
    assert tp_rows[-1]["train_loss"] != dp_rows[-1]["train_loss"]  # the lost activations count
    # buckets.csv says which traffic lost what: a row per tp collective kind, summing to the columns
    traffic = [r for r in rows(tp_dir / "round0" / "buckets.csv") if r["drop_point"] == "tp"]
    assert {r["bucket"] for r in traffic} == {"all_reduce"}  # Megatron TP: all-reduces only
    for row in tp_rows:
        mine = [r for r in traffic if r["epoch"] == row["epoch"]]
        assert sum(int(r["packets_sent"]) for r in mine) == int(row["tp_packets_sent"])
        assert sum(int(r["packets_lost"]) for r in mine) == int(row["tp_packets_lost"])


@uses(*CUTS, "pp_resume", "ep_resume", "ppf_resume", "pp_loss", "ep_loss", "ppf_loss")
@pytest.mark.parametrize(
    "kind, lossy",
    [("pp", ("tp", "pp")), ("ep", ("ep",)), ("ppf", ("pp", "worker", "gather"))],
    ids=["tp-pp", "fsdp-ep", "fsdp-pp"],
)
def test_killed_model_parallel_run_resumes_exactly(study, kind, lossy):
    """Killed after epoch 2's row, resumed from epoch 1's checkpoint (the dp hook's, the
    all-gather's and every type's group states, each rank's shards, stage or experts and
    optimizer, under FSDP2 their local shards): every row equals the uninterrupted run's.
    tp x pp at W = 4 (sequence-parallel tp 5% and pp 10% lost, 1F1B, DDP); FSDP2 with ep at
    W = 2 (stale); FSDP2 over dp = 2 per stage x pp = 2 at W = 4 (pp 10%, dp worker 5%,
    all-gather 5%: the stage's root module resharded at each checkpoint, as a resumed run
    starts)."""
    cut = study.fact(f"{kind}_cut")
    assert cut["code"] != 0 and "Signal 9 (SIGKILL)" in cut["output"]
    _, resumed = metrics(study, f"{kind}_resume")
    assert "resumed after epoch 1" in study.result(f"{kind}_resume")["stdout"]
    _, reference = metrics(study, f"{kind}_loss")
    drop = {"epoch_seconds", "images_per_s"}
    assert [r["epoch"] for r in resumed] == ["1", "2", "3"]
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == [
        {k: v for k, v in r.items() if k not in drop} for r in reference
    ]
    for traffic in lossy:
        assert int(reference[-1][f"{traffic}_packets_lost"]) > 0, traffic


@uses("base_steps8", "pp0", "moe", "ep0")
def test_lossless_pp_and_ep_train_the_model_of_a_run_without_them(study):
    """Loss 0: two GPipe stages (2 micro-batches per step) train the one-rank model of the
    same 8 steps, and the experts sharded over 2 ranks the MoE model of 2 DDP ranks holding
    every expert (the same capacity drops): equal to the 6 digits metrics.csv keeps (torch
    sums the experts' rows in another order: measured equal); the type's packets counted,
    none lost."""
    for ref_name, name, kind in (("base_steps8", "pp0", "pp"), ("moe", "ep0", "ep")):
        _, ref = metrics(study, ref_name)
        run_dir, run = metrics(study, name)
        assert f"_{'pp2' if kind == 'pp' else 'moe-ep2'}_" in run_dir.name
        assert [r["steps"] for r in run] == [r["steps"] for r in ref]
        for a, b in zip(ref, run, strict=True):
            for key in ("train_loss", "val_loss", "val_perplexity", "train_acc", "val_acc"):
                assert float(b[key]) == pytest.approx(float(a[key]), rel=2e-5), (name, key)
            assert int(b[f"{kind}_packets_sent"]) > 0 and b[f"{kind}_packets_lost"] == "0"
            assert a[f"{kind}_packets_sent"] == ""
        if kind == "ep":  # the capacity's own drops, the same with and without ep
            assert [r["moe_dropped_slots"] for r in run] == [r["moe_dropped_slots"] for r in ref]
            assert all(0 < int(r["moe_dropped_slots"]) < int(r["moe_routed_slots"]) for r in run)


@uses("dp2_steps4", "pp_fsdp", "moe", "ep0_fsdp")
def test_lossless_pp_and_ep_under_fsdp_train_the_model_of_ddp(study):
    """Loss 0 under FSDP2: 2 stages, each sharded over a dp group of 2 (W = 4), train the
    2-rank DDP model of the same 4 steps; the experts over ep = 2, left out of FSDP's
    sharding (``ignored_params``) and reduced outside it, the 2-rank DDP MoE model with the
    same capacity drops: equal to the 6 digits metrics.csv keeps (rel 2e-5)."""
    cases = (("dp2_steps4", "pp_fsdp", "_fsdp_pp2_"), ("moe", "ep0_fsdp", "_fsdp_moe-ep2_"))
    for ref_name, name, part in cases:
        _, ref = metrics(study, ref_name)
        run_dir, run = metrics(study, name)
        assert part in run_dir.name
        assert [r["steps"] for r in run] == [r["steps"] for r in ref]
        for a, b in zip(ref, run, strict=True):
            for key in ("train_loss", "val_loss", "val_perplexity", "train_acc", "val_acc"):
                assert float(b[key]) == pytest.approx(float(a[key]), rel=2e-5), (name, key)
            assert a["moe_dropped_slots"] == b["moe_dropped_slots"]
        assert float(run[-1]["val_loss"]) < float(run[0]["train_loss"])


@uses("pp0", "pp0_1f1b")
def test_1f1b_schedule_trains_the_model_of_gpipe(study):
    """Loss 0: 1F1B runs the micro-batches' forward and backward passes in another order
    than GPipe, the same sums: the rows equal GPipe's (the 6 digits metrics.csv keeps), as
    many pp packets, and the folder says the schedule."""
    _, gpipe = metrics(study, "pp0")
    run_dir, one = metrics(study, "pp0_1f1b")
    assert "_pp2-1f1b_" in run_dir.name
    drop = {"epoch_seconds", "images_per_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in one] == [
        {k: v for k, v in r.items() if k not in drop} for r in gpipe
    ]


@uses("moe_w4", "ep_w4")
def test_expert_replicas_train_the_model_of_a_run_without_ep(study):
    """W = 4, ep = 2: each expert on two ranks, its gradient summed over them and divided by W
    (reduce_expert_gradients): the training rows equal the 4-rank DDP run holding every
    expert (validation differs: under --ep the set is cut to a multiple of W, 20 of 22)."""
    _, ref = metrics(study, "moe_w4")
    _, run = metrics(study, "ep_w4")
    for a, b in zip(ref, run, strict=True):
        for key in ("train_loss", "train_acc", "moe_dropped_slots", "moe_routed_slots"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=2e-5), key
        assert int(b["ep_packets_sent"]) > 0 and b["ep_packets_lost"] == "0"


@uses("base_steps8", "tp_pp", "tp_pp_loss", "moe", "tp_ep", "moe_steps4", "pp_ep", "tp_pp_fsdp", "pp_ep_fsdp")
def test_composed_parallelisms_train_the_model_of_a_run_without_them(study):
    """Loss 0 at W = 4: 2 stages of 2 tensor-parallel ranks each train the one-rank model of
    the same 8 steps, and 2 replicas of 2 tp ranks with the experts over the replicas (ep=2
    within dp=2) the MoE model of 2 DDP ranks (the same capacity drops), up to the order of
    the tp sums (rel 1e-4; 5e-4 for the MoE model, whose top-2 routing turns round-off into
    other experts: measured 1.8e-4 on the validation perplexity, 1 capacity drop in 5,746);
    and an MoE model's 2 stages over 2 replicas each, the experts of a stage over its 2
    replicas (pp=2, ep=2 within dp=2), the 2-rank MoE model of the same 4 steps: each stage's
    load-balancing loss joins the schedule's backward (measured: without it the train loss
    moves by 4e-4 relative). Under FSDP2 too: tp x pp with sequence parallelism and 1F1B
    (dp = 1), pp x ep of the MoE model. With pp=10% on top (and the 1F1B schedule: the same messages in
    another order) only the pp counters move: the tp packets are the same and all arrive, the
    pp losses in the 99.9% binomial interval."""
    cases = (
        ("base_steps8", "tp_pp", ("tp", "pp"), 1e-4, "_tp2_pp2_"),
        ("moe", "tp_ep", ("tp", "ep"), 5e-4, "_tp2_moe-ep2_"),
        ("moe_steps4", "pp_ep", ("pp", "ep"), 2e-5, "_pp2_moe-ep2_"),
        ("base_steps8", "tp_pp_fsdp", ("tp", "pp"), 1e-4, "_fsdp_tp2-sp_pp2-1f1b_"),
        ("moe_steps4", "pp_ep_fsdp", ("pp", "ep"), 2e-5, "_fsdp_pp2_moe-ep2_"),
    )
    for ref_name, name, kinds, rel, part in cases:
        _, ref = metrics(study, ref_name)
        run_dir, run = metrics(study, name)
        assert part in run_dir.name
        assert [r["steps"] for r in run] == [r["steps"] for r in ref]
        for a, b in zip(ref, run, strict=True):
            for key in ("train_loss", "val_loss", "val_perplexity"):
                assert float(b[key]) == pytest.approx(float(a[key]), rel=rel), (name, key)
            for key in ("train_acc", "val_acc"):
                assert float(b[key]) == pytest.approx(float(a[key]), abs=2e-3), (name, key)
            for kind in kinds:
                assert int(b[f"{kind}_packets_sent"]) > 0 and b[f"{kind}_packets_lost"] == "0", (name, kind)
        if "ep" in kinds:  # the same capacity drops in epoch 1, then within round-off's flips
            assert run[0]["moe_dropped_slots"] == ref[0]["moe_dropped_slots"]
            for a, b in zip(ref, run, strict=True):
                assert int(b["moe_dropped_slots"]) == pytest.approx(int(a["moe_dropped_slots"]), rel=1e-3)
    _, lossless = metrics(study, "tp_pp")
    _, lossy = metrics(study, "tp_pp_loss")
    for a, b in zip(lossless, lossy, strict=True):
        assert (a["tp_packets_sent"], a["pp_packets_sent"]) == (b["tp_packets_sent"], b["pp_packets_sent"])
        assert b["tp_packets_lost"] == "0"
    sent = sum(int(r["pp_packets_sent"]) for r in lossy)
    lost = sum(int(r["pp_packets_lost"]) for r in lossy)
    lo, hi = binomial_interval(sent, 0.1, 0.999)
    assert lo <= lost <= hi, (sent, lost)
    assert lossy[0]["train_loss"] != lossless[0]["train_loss"]


@uses("pp_loss", "tp_pp_loss")
def test_sequence_parallel_traffic_is_gathers_and_scatters(study):
    """tp x pp at W = 4 with --sequence_parallel, tp 5% lost: buckets.csv has the tp traffic
    as all-gathers and reduce-scatters (and the norms' gradient all-reduces, a few packets),
    in the ratio of a one-block stage's step (5 all-gathers to 4 reduce-scatters of equal
    size: the stream stays split between the stages, test_group.py), the pp messages half
    the sequence (the tp2 x pp2 run's per packet count halved), and the tp losses in the
    99.9% binomial interval of 5%."""
    run_dir, run = metrics(study, "pp_loss")
    assert "_tp2-sp_pp2-1f1b_" in run_dir.name
    traffic = [r for r in rows(run_dir / "round0" / "buckets.csv") if r["drop_point"] == "tp"]
    sent = {kind: sum(int(r["packets_sent"]) for r in traffic if r["bucket"] == kind) for kind in KINDS}
    assert sent["all_gather"] * 4 == sent["reduce_scatter"] * 5
    _, whole = metrics(study, "tp_pp_loss")  # tp2 x pp2 without sequence parallelism, 1 epoch
    assert int(run[0]["pp_packets_sent"]) * 2 == int(whole[0]["pp_packets_sent"])
    assert 0 < sent["all_reduce"] < sent["reduce_scatter"] / 20
    total = sum(int(r["tp_packets_sent"]) for r in run)
    lost = sum(int(r["tp_packets_lost"]) for r in run)
    assert total == sum(sent.values())
    lo, hi = binomial_interval(total, 0.05, 0.999)
    assert lo <= lost <= hi, (total, lost)


@uses("ep_loss", "ep0_fsdp")
def test_ep_traffic_loss_moves_only_its_counters(study):
    """10% on ep alone (stale): the data-parallel packets all arrive, the ep lost packets are
    in the 99.9% binomial interval of 10% of its sent ones, and the lost tokens change the
    training (pp alone: test_composed_parallelisms_train_the_model_of_a_run_without_them)."""
    kind = "ep"
    _, lossy = metrics(study, "ep_loss")
    _, lossless = metrics(study, "ep0_fsdp")
    sent = sum(int(r[f"{kind}_packets_sent"]) for r in lossy)
    lost = sum(int(r[f"{kind}_packets_lost"]) for r in lossy)
    lo, hi = binomial_interval(sent, 0.1, 0.999)
    assert lo <= lost <= hi, (sent, lost)
    assert all(r["post_packets_lost"] == "0" and int(r["post_packets_sent"]) > 0 for r in lossy)
    assert lossy[0]["train_loss"] != lossless[0]["train_loss"]


# ------------------------------------------------------------------ refusals (no launch)


@pytest.mark.parametrize(
    "flags, world, message",
    [
        (["--tp", "0"], 1, "--tp must be >= 1"),
        (["--model", "resnet18", "--tp", "2"], 2, "--tp 2 needs a language model"),
        (["--tp", "3"], 3, "--tp 3 must divide the 4 attention heads of gpt-tiny"),
        (["--tp", "4"], 6, "--tp 4 must divide the world size 6"),
        (["--tp", "2", "--measure_drift", "5"], 2, "--measure_drift with --tp 2"),
        (["--traffic_loss", "tp=10%"], 2, "--traffic_loss tp: this run has no tensor-parallel traffic"),
        (["--tp", "2", "--traffic_loss", "pp=1%"], 2, "pp: this run has no pipeline-parallel"),
        (["--tp", "2", "--traffic_loss", "ep=1%"], 2, "(it needs --ep > 1)"),
        (["--tp", "2", "--traffic_loss", "xx=1%"], 2, "--traffic_loss: unknown traffic type 'xx'"),
        (["--tp", "2", "--traffic_loss", "tp=1.5"], 2, "--traffic_loss: tp=1.5: a rate must be in [0, 1]"),
        (["--tp", "2", "--traffic_loss", "tp=150%"], 2, "a rate must be in [0, 1]"),
        (["--tp", "2", "--traffic_loss", "tp=oops 5"], 2, "--traffic_loss: tp=oops 5:"),
        (["--tp", "2", "--traffic_loss", "tp"], 2, "expected TYPE=RATE"),
        (["--tp", "2", "--traffic_loss", "tp=1%,tp=2%"], 2, "given twice"),
        (["--tp", "2", "--traffic_loss", "tp=1%", "--traffic_fill", "rescale"], 2, "loses all_gather too"),
        (["--tp", "2", "--traffic_loss", "tp=deadline 1.5x"], 2, "tp: the deadline loss model needs"),
        (["--tp", "2", "--traffic_fill", "stale"], 2, "--traffic_fill stale needs --traffic_loss"),
        (["--sequence_parallel"], 2, "--sequence_parallel needs --tp > 1"),
        (
            ["--model", "moe-tiny", "--tp", "2", "--ep", "2", "--sequence_parallel"],
            4,
            "--sequence_parallel with --ep 2: the MoE layer takes the gathered sequence",
        ),
        (["--pp", "0"], 1, "--pp must be >= 1"),
        (["--pp", "3"], 3, "--pp 3: more stages than the 2 layers of gpt-tiny"),
        (["--pp", "2"], 3, "--pp 2 must divide the world size 3"),
        (["--pp", "2", "--amp"], 2, "--pp 2 with --amp"),
        (
            ["--pp", "2", "--pp_schedule", "1f1b", "--accumulation_steps", "1"],
            2,
            "--pp_schedule 1f1b needs --accumulation_steps >= --pp 2",
        ),
        (["--pp_schedule", "1f1b"], 1, "--pp_schedule 1f1b needs --pp > 1"),
        (
            ["--pp", "2", "--tp", "2"],
            6,
            "--tp 2 x --pp 2 = 4 must divide the world size 6 (W = dp x pp x tp)",
        ),
        (["--model", "moe-tiny", "--pp", "2", "--ep", "2"], 2, "--ep 2 must divide the data-parallel size 1"),
        (["--model", "moe-tiny", "--tp", "2", "--ep", "2"], 2, "--ep 2 must divide the data-parallel size 1"),
        (["--pp", "2", "--traffic_loss", "pp=1%", "--traffic_fill", "rescale"], 2, "loses p2p too"),
        (["--ep", "2"], 2, "--ep 2 needs an MoE model (--model moe-tiny|moe-small)"),
        (["--model", "moe-tiny", "--ep", "3"], 3, "--ep 3 must divide the 4 experts of moe-tiny"),
        (["--model", "moe-tiny", "--ep", "2"], 3, "--ep 2 must divide the world size 3"),
        (["--model", "moe-tiny", "--ep", "2", "--resync", "5"], 2, "--resync with --ep 2"),
        (["--model", "moe-tiny", "--ep", "2", "--traffic_loss", "pp=1%"], 2, "(it needs --pp > 1)"),
        (
            ["--model", "moe-tiny", "--ep", "2", "--traffic_loss", "ep=1%", "--traffic_fill", "rescale"],
            2,
            "loses all_to_all too",
        ),
    ],
)
def test_model_parallel_and_traffic_refusals_exit_2_naming_the_flag(
    flags, world, message, capsys, tmp_path, monkeypatch
):
    """Every refusal exits 2 with its message before any process group or file exists (the
    world size read from the launcher's variables, as under torchrun)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as exc:
        train_ddp.main(["--model", "gpt-tiny", *flags, "--output_dir", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_traffic_loss_syntax():
    """A fraction, a percentage or netem text per type."""
    assert parse_traffic_loss("tp=0.05")["tp"].spec == "random 5%"
    assert parse_traffic_loss(" tp = 5% ")["tp"].spec == "random 5%"
    assert parse_traffic_loss("tp=gemodel 1% 20%")["tp"].spec.startswith("gemodel 1% 20%")
    assert set(parse_traffic_loss("tp=1%,pp=0,ep=1")) == {"tp", "pp", "ep"}


def test_tp_folder_names_fit_the_documented_pattern(monkeypatch):
    """``_tp2`` and ``_tl-...`` parts where docs/reference.md's pattern puts them (W=4 read
    from the launcher's variables)."""
    import shlex

    from lossy_hooks.study.cli import resolve
    from lossy_hooks.study.flags import build_parser
    from lossy_hooks.study.run_names import config_name

    from .test_readme import _readme_pattern

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    parser = build_parser()
    argv = "--model gpt-tiny --tp 2 --traffic_loss 'tp=gemodel 1% 20%' --traffic_fill stale --optimizer adamw"
    name = config_name(resolve(parser.parse_args(shlex.split(argv)), parser))
    assert _readme_pattern().fullmatch(name), name
    assert "_w4_" in name and "_tp2_tl-tp-gemodel-1pct-20pct-100pct-0pct-stale_adamw" in name

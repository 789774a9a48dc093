"""The traffic study (lossy_hooks.experiments.traffic_study) without a launch: its grid (types
per model, the lossless run per layout, each type's flags and fills against the study
script's own parser), its table from run folders written as train_ddp.py writes them, the
relative change and measured loss against closed forms, its refusals and its dry run."""

from __future__ import annotations

import csv
import math
import re

import pytest

from lossy_hooks.experiments import traffic_study as ts
from lossy_hooks.experiments.lm_runs import final_perplexities
from lossy_hooks.study.run_io import MetricsLog, write_json, write_summary
from lossy_hooks.study.sweeping.launch import run_dir_for

RATES = [0.0, 0.01, 0.05, 0.1, 0.2]


def test_each_model_gets_the_types_it_has_with_one_lossless_run_per_layout():
    grid = ts.configurations(["gpt-tiny", "moe-tiny"], list(ts.TRAFFIC), list(ts.FILLS), RATES)
    # 4 types of gpt-tiny, 5 of moe-tiny: each 2 fills x 4 rates + lossless
    assert len(grid) == (4 + 5) * (1 + 4 * 2) == 81
    lossless = [(c.model, c.layout) for c in grid if c.rate == 0.0]
    assert lossless == [
        *[("gpt-tiny", layout) for layout in ("ddp", "fsdp", "tp2", "pp2")],
        *[("moe-tiny", layout) for layout in ("ddp", "fsdp", "tp2", "pp2", "ep4")],
    ]
    assert all(c.fill == "" for c in grid if c.rate == 0.0)
    assert {c.traffic for c in grid if c.model == "gpt-tiny"} == {"dp", "gather", "tp", "pp"}  # no ep
    assert {c.traffic for c in grid if c.model == "moe-tiny"} == {"dp", "gather", "tp", "pp", "ep"}
    assert {c.fill for c in grid if c.fill == "rescale"} == {"rescale"}
    assert {c.traffic for c in grid if c.fill == "rescale"} == {"dp"}
    assert sorted({c.rate for c in grid}) == RATES
    flags = {(c.model, c.traffic, c.fill, c.rate): c.flags for c in grid}
    assert flags["gpt-tiny", "dp", "zero", 0.05] == (
        "--strategy", "ddp", "--drop_point", "worker", "--loss_rate", "0.05", "--fill", "zero",
    )  # fmt: skip
    assert flags["moe-tiny", "gather", "stale", 0.2] == (
        "--strategy", "fsdp", "--all_gather_loss_rate", "0.2", "--all_gather_fill", "stale",
    )  # fmt: skip
    traffic = ("--traffic_loss", "--traffic_fill")
    assert flags["gpt-tiny", "tp", "stale", 0.1] == ("--tp", "2", traffic[0], "tp=0.1", traffic[1], "stale")
    assert flags["gpt-tiny", "pp", "zero", 0.01] == ("--pp", "2", traffic[0], "pp=0.01", traffic[1], "zero")
    assert flags["moe-tiny", "ep", "zero", 0.2] == ("--ep", "4", traffic[0], "ep=0.2", traffic[1], "zero")
    assert flags["moe-tiny", "tp", "", 0.0] == ("--tp", "2")
    assert flags["gpt-tiny", "dp", "", 0.0] == ("--strategy", "ddp", "--drop_point", "worker")


def test_selections_cut_the_grid():
    # rescale applies to dp only; tp with no allowed fill has no configuration (not even lossless)
    grid = ts.configurations(["gpt-tiny"], ["tp", "dp"], ["rescale"], [0.1, 0.2, 0.0])
    got = [(c.traffic, c.fill, c.rate) for c in grid]
    assert got == [("dp", "", 0.0), ("dp", "rescale", 0.1), ("dp", "rescale", 0.2)]
    assert ts.configurations(["gpt-tiny"], ["ep"], list(ts.FILLS), RATES) == []
    # without rate 0 in the list the lossless runs are still there (the relative change needs them)
    assert len(ts.configurations(["moe-tiny"], ["ep", "gather"], ["stale"], [0.1])) == 4


def _parser_knows(flags: tuple[str, ...]) -> bool:
    path, error = run_dir_for(["--model", "moe-tiny", *flags], 4)
    return path is not None or "unrecognized arguments" not in error


@pytest.mark.parametrize("name", list(ts.TRAFFIC))
def test_each_type_s_fills_are_the_ones_the_study_script_accepts(name, tmp_path):
    """Each fill of TRAFFIC is accepted by train_ddp.py's own checks, each other fill refused
    (pp, ep: skipped while the study script has no --pp / --ep)."""
    traffic = ts.TRAFFIC[name]
    if not _parser_knows(traffic.layout_flags):
        pytest.skip(f"the study script has no {traffic.layout_flags[0]} yet")
    model = "moe-tiny" if traffic.models == "moe" else "gpt-tiny"
    base = ["--model", model, "--output_dir", str(tmp_path), *traffic.layout_flags]
    for fill in ts.FILLS:
        path, error = run_dir_for([*base, *traffic.loss_flags(name, 0.05, fill)], 4)
        assert (path is not None) == (fill in traffic.fills), (fill, error)


def test_the_default_grid_s_folders_are_distinct(tmp_path):
    args = ts.parse_args(["--out", str(tmp_path)])
    folders = [x["run_dir"] for x in ts.plan(args) if x["run_dir"] is not None]
    assert len(folders) >= 54  # dp, gather and tp of both models, whatever pp and ep can do yet
    assert len(set(folders)) == len(folders)


BASE = {"ddp": 10.0, "fsdp": 11.0, "tp2": 12.0, "pp2": 13.0}  # lossless perplexity of round 0
SLOPE = {"zero": 0.5, "stale": 4.0, "rescale": 0.1}  # perplexity change per unit of loss


def closed_form(c: ts.Config, k: int) -> float:
    """Round ``k``'s final perplexity: ``BASE (1 + k/10) (1 + SLOPE rate (k + 1))``, so that
    the change against the lossless round of the same seed is ``SLOPE rate (k + 1)``."""
    model = 5.0 if c.model == "moe-tiny" else 0.0
    return (BASE[c.layout] + model) * (1 + k / 10) * (1 + SLOPE.get(c.fill, 0.0) * c.rate * (k + 1))


def write_run(run_dir, c: ts.Config, rounds: int) -> None:
    """The files train_ddp.py leaves: config.json, per round metrics.csv (two epochs; the
    traffic's own counters 200 packets an epoch, ``200 rate + k`` of them lost in round k;
    the other counters lossless) and status.json, summary.csv."""
    run_dir.mkdir(parents=True)
    write_json(run_dir / "config.json", {"model": c.model, "lab_round": rounds, "corpus_mb": 0.5})
    for k in range(rounds):
        (run_dir / f"round{k}").mkdir()
        log = MetricsLog(run_dir / f"round{k}" / "metrics.csv")
        for epoch in (1, 2):
            row = {"epoch": epoch, "steps": 10 * epoch, "train_loss": 3.0, "val_loss": 2.5, "val_acc": 0.3}
            row["val_perplexity"] = 2 * closed_form(c, k) if epoch == 1 else closed_form(c, k)
            row |= {"worker_packets_sent": 1000, "worker_packets_lost": 0}
            if c.layout == "tp2":
                row |= {"tp_packets_sent": 200, "tp_packets_lost": 0}
            lost = round(200 * c.rate) + k if c.rate else 0
            counters = ts.TRAFFIC[c.traffic].counters
            if c.rate:  # FSDP's all-gather has counters when it loses (as rounds.py writes them)
                row |= {f"{counters}_packets_sent": 200, f"{counters}_packets_lost": lost}
            log.append(row)
        write_json(run_dir / f"round{k}" / "status.json", {"status": "finished", "epochs": 2})
    write_summary(run_dir, rounds)


def test_the_table_from_run_folders_against_closed_forms(tmp_path, monkeypatch):
    out = tmp_path / "runs"
    argv = ["--out", str(out), "--models", "gpt-tiny,moe-tiny", "--types", "tp,gather,dp"]
    argv += ["--rates", "0.05,0,0.2", "--rounds", "3"]
    args = ts.parse_args(argv)
    planned = {tuple(x["argv"]): x for x in ts.plan(args)}
    assert len(planned) == 2 * 3 * (1 + 2 * 2)
    launched = []

    def fake_run_config(run_argv, nproc, label):  # a launch that writes what train_ddp.py would
        x = planned[tuple(run_argv)]
        assert nproc == 4 and label == x["config"].label
        write_run(x["run_dir"], x["config"], args.rounds)
        launched.append(x["config"])
        return x["run_dir"]

    monkeypatch.setattr(ts, "run_config", fake_run_config)
    done = next(x for x in planned.values() if x["config"].label == "gpt-tiny fsdp lossless")
    write_run(done["run_dir"], done["config"], args.rounds)  # finished before: not launched again
    assert ts.main(argv) == 0
    assert len(launched) == len(planned) - 1 and done["config"] not in launched
    with open(out / "traffic_study.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 3 * 2 * 3  # model x type x fill x rate (0, 0.05, 0.2)
    for r in rows:
        rate, fill = float(r["loss_rate"]), r["fill"]
        c = ts.Config(r["model"], r["type"], fill if rate else "", rate, ())
        ppl = [closed_form(c, k) for k in range(3)]
        assert float(r["perplexity_mean"]) == pytest.approx(sum(ppl) / 3, rel=1e-5)
        std = math.dist(ppl, [sum(ppl) / 3] * 3) / math.sqrt(2)  # the sample std
        assert float(r["perplexity_std"]) == pytest.approx(std, rel=1e-4)
        # paired by seed: SLOPE rate (k + 1) for k = 0, 1, 2 -> mean 2 SLOPE rate, sample std SLOPE rate
        assert float(r["relative_change_mean"]) == pytest.approx(2 * SLOPE[fill] * rate, rel=1e-5, abs=1e-12)
        assert float(r["relative_change_std"]) == pytest.approx(SLOPE[fill] * rate, rel=1e-5, abs=1e-12)
        lost = 2 * sum(round(200 * rate) + k for k in range(3)) if rate else 0  # 2 epochs a round
        measured = float(r["loss_measured"])
        if r["type"] == "gather" and rate == 0:  # the lossless FSDP run counts no all-gather packets
            assert math.isnan(measured)
        else:  # the type's own counters only (worker's are lossless but for dp)
            assert measured == pytest.approx(lost / (2 * 3 * 200), rel=1e-5)
        assert r["layout"] == ts.TRAFFIC[r["type"]].layout and r["rounds"] == "3"
    by_key = {(r["model"], r["type"], r["fill"], r["loss_rate"]): r for r in rows}
    assert by_key["moe-tiny", "tp", "stale", "0.2"]["relative_change_mean"] == "1.6"  # 2 x 4.0 x 0.2
    # the two lines of a type share its lossless run
    dp_lossless = {by_key["gpt-tiny", "dp", fill, "0"]["run_dir"] for fill in ("zero", "rescale")}
    assert len(dp_lossless) == 1 and "random-0pct" in dp_lossless.pop()
    for name in ("perplexity_vs_loss.png", "relative_change.png"):
        assert (out / name).stat().st_size > 10_000


def test_summarize_pairs_each_round_with_its_layout_s_lossless_round():
    def record(model, traffic, fill, rate, rounds):
        return {"config": ts.Config(model, traffic, fill, rate, ()), "rounds": rounds, "loss_measured": rate}

    records = [
        record("gpt-tiny", "pp", "", 0.0, [8.0, 16.0]),
        record("gpt-tiny", "pp", "zero", 0.1, [9.0, 24.0]),
        record("moe-tiny", "ep", "stale", 0.1, [9.0]),  # no lossless ep4 run: no change
        record("moe-tiny", "ep", "zero", 0.2, [9.0]),
    ]
    rows = ts.summarize([r | {"run_dir": "x"} for r in records], ["zero", "stale", "rescale"])
    keyed = {(r["model"], r["type"], r["fill"], r["loss_rate"]): r for r in rows}
    assert list(keyed) == [
        ("gpt-tiny", "pp", "zero", 0.0),
        ("gpt-tiny", "pp", "zero", 0.1),
        ("gpt-tiny", "pp", "stale", 0.0),  # the lossless run starts the stale line too
        ("moe-tiny", "ep", "zero", 0.2),
        ("moe-tiny", "ep", "stale", 0.1),
    ]
    pp = keyed["gpt-tiny", "pp", "zero", 0.1]
    assert pp["relative_change_mean"] == pytest.approx((9 / 8 - 1 + 24 / 16 - 1) / 2) == 0.3125
    assert pp["relative_change_std"] == pytest.approx((1.5 - 1.125) / math.sqrt(2))
    assert pp["perplexity_mean"] == 16.5 and pp["perplexity_std"] == pytest.approx(15 / math.sqrt(2))
    assert keyed["gpt-tiny", "pp", "stale", 0.0]["relative_change_mean"] == 0.0
    assert math.isnan(keyed["moe-tiny", "ep", "stale", 0.1]["relative_change_mean"])


def test_final_perplexities_read_only_the_counters_asked_for(tmp_path):
    fields = ["epoch", "val_perplexity", "worker_packets_sent", "worker_packets_lost", "pp_packets_sent"]
    fields.append("pp_packets_lost")
    for k, rows in ((0, [[1, 30, 100, 50, 40, 4], [2, 20, 100, 50, 40, 2]]), (2, [[1, 7, 10, 0, 20, 0]])):
        (tmp_path / f"round{k}").mkdir()
        with open(tmp_path / f"round{k}" / "metrics.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([fields, *rows])
    ppl, pp = final_perplexities(tmp_path, 3, ("pp",))  # round 1 has no file: skipped
    assert ppl == [20.0, 7.0] and pp == pytest.approx(6 / 100)
    assert final_perplexities(tmp_path, 3)[1] == pytest.approx(100 / 210)  # lm_study's: worker, post, gather


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--rates", "0.1,1.5"], "--rates"),
        (["--rates", "-0.01"], "--rates"),
        (["--rates", "0.1,ten"], "--rates"),
        (["--types", "dp,nvlink"], "--types"),
        (["--fills", "zero,interpolate"], "--fills"),
        (["--models", "gpt-huge"], "--models"),
        (["--rounds", "0"], "--rounds"),
        (["--nproc", "1"], "--nproc"),
        (["--launch_seconds", "0"], "--launch_seconds"),
        (["--types", "gather", "--rates", "1"], "--all_gather_loss_rate"),  # refused by train_ddp.py's checks
    ],
)
def test_bad_input_exits_2_naming_the_flag_before_any_launch(argv, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ts, "run_config", lambda *a: pytest.fail("launched"))
    with pytest.raises(SystemExit) as exc:
        ts.main(["--out", str(tmp_path), "--models", "gpt-tiny", *argv])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_dry_run_prints_the_plan_its_count_and_its_cost(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ts, "run_config", lambda *a: pytest.fail("launched"))
    argv = ["--out", str(tmp_path), "--dry_run", "--models", "gpt-tiny", "--types", "dp,tp"]
    assert ts.main([*argv, "--fills", "zero,stale", "--rates", "0,0.1", "--launch_seconds", "720"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("  ")[0] for ln in lines[:-1]] == [
        "gpt-tiny ddp lossless",
        "gpt-tiny dp zero at 10%",
        "gpt-tiny tp2 lossless",
        "gpt-tiny tp zero at 10%",
        "gpt-tiny tp stale at 10%",
    ]
    assert "tl-tp-random-10pct-stale" in lines[4]
    assert lines[-1].startswith("5 configurations (0 refused by the study script, 0 done before); ")
    assert lines[-1].endswith("5 launches x 720 s = 1.0 h (--launch_seconds)")
    assert list(tmp_path.iterdir()) == []
    assert ts.main(["--out", str(tmp_path), "--dry_run"]) == 0  # the whole grid, whatever is refused yet
    last = capsys.readouterr().out.splitlines()[-1]
    assert re.match(r"81 configurations \(\d+ refused by the study script, 0 done before\); 81 launch", last)
    assert last.endswith(f"x 165 s = {81 * 165 / 3600:.1f} h (--launch_seconds)")


def test_collect_only_tables_what_finished_and_launches_nothing(tmp_path, monkeypatch):
    """``--collect_only``: the finished configurations' rows (a partial grid: dp at 0 and 10%,
    pp's lossless run), nothing launched, the unfinished ones left out."""
    out = tmp_path / "runs"
    argv = [
        "--out",
        str(out),
        "--models",
        "gpt-tiny",
        "--types",
        "dp,pp",
        "--rates",
        "0,0.1",
        "--rounds",
        "1",
    ]
    planned = ts.plan(ts.parse_args(argv))
    finished = [x for x in planned if x["config"].traffic == "dp" or not x["config"].fill]
    for x in finished:
        write_run(x["run_dir"], x["config"], 1)
    monkeypatch.setattr(ts, "run_config", lambda *a: pytest.fail("--collect_only launched a run"))
    assert ts.main([*argv, "--collect_only"]) == 0
    with open(out / "traffic_study.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    got = sorted((r["type"], r["fill"], r["loss_rate"]) for r in rows)
    # dp: its lossless run on both lines, each fill at 10%; pp: its lossless run on its two lines
    assert got == sorted(
        [("dp", f, rate) for f in ("zero", "rescale") for rate in ("0", "0.1")]
        + [("pp", f, "0") for f in ("zero", "stale")]
    )

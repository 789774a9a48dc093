"""The time-to-accuracy study tool on a tiny setting (3 configurations: the reliable and one
deadline transport for one epoch, one bucket-size configuration; run by warm workers, not a
launch each): its files, and the figures that have closed forms."""

from __future__ import annotations

import csv

import pytest

from lossy_hooks.experiments.time_placement import PLACEMENT_SETTINGS, placement_configurations
from lossy_hooks.experiments.time_study import (
    BUCKET_LOSSES,
    FILLS,
    SETTINGS,
    accuracy_configurations,
    main,
)
from lossy_hooks.study.sweeping.launch import run_dir_for


def test_grid():
    grid = accuracy_configurations([1.05, 1.3])
    assert len(grid) == len(SETTINGS) * (1 + 2 * len(FILLS))
    reliable = [g for g in grid if g[1] == "reliable"]
    assert all(g[3][-2:] == ["--loss_rate", "0"] for g in reliable)
    assert ("stragglers", "hadamard+rescale", 1.3) in {g[:3] for g in grid}
    assert len(BUCKET_LOSSES) == 5


def test_placement_grid_resolves_to_one_folder_per_configuration():
    grid = placement_configurations()
    assert len(grid) == len(PLACEMENT_SETTINGS) * 4 * 5  # reliable + (fixed, adaptive) x (zero, rescale)
    base = ["--dataset", "digits", "--model", "resnet18", "--bandwidth_gbps", "1", "--worker_drop"]
    folders = set()
    for *_, flags in grid:  # every combination passes train_ddp.py's checks at W = 4
        run_dir, error = run_dir_for([*base, *flags], 4)
        assert run_dir is not None, (flags, error)
        folders.add(run_dir.name)
    assert len(folders) == len(grid)
    assert any("_ring_" in f and "deadline-adaptive" in f for f in folders)
    # both phases cut per hop: the same reliable runs, no adaptive rescale, ps at its worker drop
    both = placement_configurations(["stragglers"], drop_point="both")
    assert len(both) == 5 + 3 * 4
    for _, algorithm, transport, fill, flags in both:
        cut = algorithm != "ps" and transport != "reliable"
        assert (flags[-2:] == ["--drop_point", "both"]) == cut, flags
        assert not (cut and transport == "adaptive" and fill == "rescale")
        run_dir, error = run_dir_for([*base, *flags], 4)
        assert run_dir is not None, (flags, error)
        assert (run_dir.name in folders) == (not cut)


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_tiny_study_writes_its_tables_and_figures(tmp_path, warm_launches):
    out = tmp_path / "study"
    flags = ["--out", str(out), "--settings", "stragglers", "--fills", "rescale", "--deadlines", "1.1"]
    flags += ["--rounds", "1", "--epochs", "1", "--target", "0.1", "--bucket_sizes", "25"]
    flags += ["--bucket_losses", "deadline, stragglers", "--bucket_steps", "3"]
    assert main(flags) == 0
    assert len(warm_launches.launches) == 3  # reliable, the deadline, the bucket configuration
    acc = {r["transport"]: r for r in rows(out / "time_study.csv")}
    assert set(acc) == {"reliable", "rescale"}
    assert float(acc["reliable"]["loss_measured"]) == 0.0 and float(acc["rescale"]["loss_measured"]) > 0.0
    for r in acc.values():
        assert r["reached"] == "1" and float(r["time_to_target_mean"]) > 0  # 10% within the epoch
    (b,) = rows(out / "bucket_study.csv")
    lossfree = float(b["lossfree_per_step_s"])
    assert lossfree > 0 and int(b["steps"]) == 3
    assert float(b["deadline_per_step_s"]) <= 1.1 * lossfree * (1 + 1e-5)  # never past the deadline
    assert float(b["reliable_per_step_s"]) >= lossfree
    assert 0 < float(b["loss_rate"]) < 1
    for name in ("time_to_accuracy.png", "time_to_target_vs_deadline.png", "bucket_size.png"):
        assert (out / name).stat().st_size > 10_000


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--target", "2"])
    assert exc.value.code == 2 and "--target must be in (0, 1]" in capsys.readouterr().err

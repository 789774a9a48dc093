"""A non-editable install runs every tool: build the package's wheel, install it into a fresh
virtual environment (its torch and the rest from the running interpreter's own import path,
which works the same whether the suite runs in the system Python, a venv or a conda env:
a venv's ``system_site_packages`` would see only the BASE interpreter's packages), and, from
a folder outside the checkout, run a one-configuration sweep (which launches the installed
``lossy_hooks.study.train`` module through torchrun) and the ``lossy-train`` console script
(its flag checks: exit 2 naming the flag).
Before the study script moved into the package, the sweep looked for train_ddp.py beside the
package and an installed copy could not run it at all."""

from __future__ import annotations

import csv
import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

from ..launch import ROOT

SMALL = ["--dataset", "digits", "--model", "squeezenet1_1", "--workers", "0", "--batch_size", "16"]


def _clean_env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e | {"OMP_NUM_THREADS": "1"}


def test_wheel_in_a_fresh_venv_runs_the_sweep_and_the_console_script(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "lossy_hooks", src / "lossy_hooks", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(wheels), str(src)], check=True, capture_output=True)
    (wheel,) = wheels.glob("lossy_hooks-*.whl")

    env_dir = tmp_path / "venv"
    python, bindir = _venv_seeing_this_interpreters_packages(env_dir)
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    pip = pip if _pip_has_python_option() else [str(python), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _clean_env() | {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    where = subprocess.run(
        [str(python), "-c", "import lossy_hooks.study.train as t; print(t.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(env_dir), f"the venv imported the package from {where}"

    sweep = [str(python), "-m", "lossy_hooks.sweep", "--nproc", "1", "--grid", "loss_rate=0.2", "--"]
    sweep += [*SMALL, "--num_epochs", "1", "--max_steps", "2", "--worker_drop", "--output_dir", "runs"]
    res = subprocess.run(sweep, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = (p for p in (work / "runs").iterdir() if p.is_dir())  # beside it: the sweep's sweep.json
    assert json.loads((run_dir / "round0" / "status.json").read_text())["status"] == "finished"
    with open(run_dir / "round0" / "metrics.csv") as fh:
        (row,) = csv.DictReader(fh)
    lost, sent = int(row["worker_packets_lost"]), int(row["worker_packets_sent"])
    assert sent > 1000 and 0.15 < lost / sent < 0.25  # 20% loss

    # the console script: the installed entry point parses and checks the flags (a training
    # run through it is the same main() the sweep's torchrun launch just ran)
    script = [str(bindir / "lossy-train"), *SMALL, "--num_epochs", "1", "--max_steps", "1"]
    bad = subprocess.run([*script, "--mtu", "2"], cwd=work, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--mtu must be >= 4 bytes" in bad.stderr
    assert sorted(p.name for p in work.iterdir()) == ["runs"]  # refused before any work


def _venv_seeing_this_interpreters_packages(env_dir: Path) -> tuple[Path, Path]:
    """A fresh venv whose Python imports what the running interpreter imports (torch, numpy,
    ...) after its own site-packages: a ``.pth`` file listing this interpreter's site
    directories. ``system_site_packages=True`` is not that inside a venv (it adds the base
    interpreter's site-packages, without this venv's torch). The lines of a ``.pth`` file
    are added to the path without running the ``.pth`` files there, so an editable install of
    this checkout does not follow into the new venv."""
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    python, bindir = env_dir / "bin" / "python", env_dir / "bin"
    theirs = subprocess.run(
        [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    ours = [p for p in dict.fromkeys(ours) if Path(p).is_dir()]
    (Path(theirs) / "outer_site_packages.pth").write_text("\n".join(ours) + "\n")
    return python, bindir


def _pip_has_python_option() -> bool:
    """pip >= 22.3 installs into another interpreter with ``--python``."""
    out = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True).stdout
    major, minor = (int(x) for x in out.split()[1].split(".")[:2])
    return (major, minor) >= (22, 3)

"""One configuration of the study script: the folder it writes (or why its flags are
invalid), and its ``torchrun`` launch on this machine. :func:`run_config` is the experiments'
one way to run a configuration."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lossy_hooks.core.process_group import free_port
from lossy_hooks.study.cli import resolve
from lossy_hooks.study.flags import build_parser
from lossy_hooks.study.run_names import config_name

__all__ = ["TRAIN_MODULE", "launch_train", "run_config", "run_dir_for"]

# the study script, launched as a module so that an installed (non-editable) package runs it
TRAIN_MODULE = "lossy_hooks.study.train"


def run_dir_for(argv: list[str], nproc: int) -> tuple[Path | None, str]:
    """The configuration folder train_ddp.py would use, and ``""``; or ``None`` and
    train_ddp.py's own error message when the flags are invalid."""
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    os.environ.update(RANK="0", WORLD_SIZE=str(nproc))
    errors = io.StringIO()
    try:
        parser = build_parser(prog="train_ddp.py")
        with contextlib.redirect_stderr(errors):
            cfg = resolve(parser.parse_args(argv), parser)
        return Path(cfg["output_dir"]) / config_name(cfg), ""
    except SystemExit:
        lines = [ln for ln in errors.getvalue().splitlines() if ln.strip()]
        return None, lines[-1] if lines else "invalid flags"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launch_train(argv: list[str], nproc: int, log: Any = None) -> subprocess.CompletedProcess:
    """One ``torchrun`` launch of train_ddp.py with ``argv`` on ``nproc`` ranks (output to
    ``log``, a file, or captured when ``None``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += [f"--master_port={free_port()}", "-m", TRAIN_MODULE, *argv]
    if log is None:
        return subprocess.run(cmd, capture_output=True, text=True)
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)


def run_config(argv: list[str], nproc: int, label: str = "") -> Path:
    """Launch one configuration (``--resume``: a finished one is not run again) and return
    its folder; exit with train_ddp.py's message when the flags are invalid or the run fails.
    The experiments' one way to run a configuration."""
    run_dir, error = run_dir_for(argv, nproc)
    if run_dir is None:
        raise SystemExit(f"{label or 'configuration'}: invalid flags ({error})")
    print(f"{label + ': ' if label else ''}{run_dir.name}", flush=True)
    res = launch_train([*argv, "--resume"], nproc)
    if res.returncode != 0:
        raise SystemExit(res.stdout[-2000:] + res.stderr[-2000:])
    return run_dir

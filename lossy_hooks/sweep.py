"""Run a grid of train_ddp.py configurations, each a torchrun launch.

    python -m lossy_hooks.sweep --nproc 2 --grid loss_rate=0,0.1,0.3 drop_point=worker,post \\
        fill=zero,rescale -- --dataset digits --model resnet18 --num_epochs 4 --lab_round 2
    python -m lossy_hooks.sweep --config sweep.toml        # or .json

A config file holds ``nproc``, ``fixed`` (flag -> value) and ``grid`` (flag -> list of values);
command-line ``--grid`` entries and flags after ``--`` are added to it. Boolean flags take
true/false. Configurations already finished (every round ended) are skipped without a
launch; unfinished ones are launched with ``--resume`` (which starts fresh where there is
nothing to resume). A failing or diverging configuration does not stop the sweep; the end
summary lists each configuration's outcome, and the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the tomli package (a dependency there)
    import tomli as tomllib

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lossy_hooks.core.process_group import free_port
from lossy_hooks.study.cli import resolve
from lossy_hooks.study.flags import build_parser
from lossy_hooks.study.run_io import round_status
from lossy_hooks.study.run_names import config_name

__all__ = [
    "expand_grid",
    "flags_for",
    "launch_train",
    "main",
    "parse_fixed",
    "run_config",
    "run_dir_for",
    "run_sweep",
]

# the study script, launched as a module so that an installed (non-editable) package runs it
TRAIN_MODULE = "lossy_hooks.study.train"
# train_ddp.py flags that take several values (--fec G R)
MULTI_VALUE_FLAGS = {"fec"}
BOOLEAN_FLAGS = {
    "use_zero",
    "use_avg",
    "worker_drop",
    "amp",
    "download",
    "measure_fidelity",
    "overwrite",
    "error_feedback",
}


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the grid, in the order given (last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def flags_for(settings: dict[str, Any]) -> list[str]:
    """train_ddp.py flags for ``{flag: value}``; booleans add or omit the flag; a list (or, for
    a flag taking several values such as ``fec``, a text with spaces: ``"8 1"``) gives
    several values."""
    out: list[str] = []
    for key, value in settings.items():
        name = "--" + key.lstrip("-")
        if key.lstrip("-") in BOOLEAN_FLAGS or isinstance(value, bool):
            if value:
                out.append(name)
        elif isinstance(value, (list, tuple)):
            out += [name, *map(str, value)]
        elif isinstance(value, str) and key.lstrip("-") in MULTI_VALUE_FLAGS:
            out += [name, *value.split()]
        else:
            out += [name, str(value)]
    return out


def parse_fixed(extra: list[str]) -> dict[str, Any]:
    """Flags after ``--`` as ``{flag: value}``: a flag alone is ``True``, a flag with several
    values (``--fec 8 1``) a list."""
    fixed: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        key = extra[i].lstrip("-")
        j = i + 1
        while j < len(extra) and not extra[j].startswith("--"):
            j += 1
        values = [_parse_value(v) for v in extra[i + 1 : j]]
        fixed[key] = True if not values else values[0] if len(values) == 1 else values
        i = j
    return fixed


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
    The study tools' one way to run a configuration."""
    run_dir, error = run_dir_for(argv, nproc)
    if run_dir is None:
        raise SystemExit(f"{label or 'configuration'}: invalid flags ({error})")
    print(f"{label + ': ' if label else ''}{run_dir.name}", flush=True)
    res = launch_train([*argv, "--resume"], nproc)
    if res.returncode != 0:
        raise SystemExit(res.stdout[-2000:] + res.stderr[-2000:])
    return run_dir


def _outcome(run_dir: Path, rounds: int) -> str:

    ended = [round_status(run_dir / f"round{k}") for k in range(rounds)]
    if any(s is None for s in ended):
        return "unfinished"
    return "diverged" if "diverged" in ended else "finished"


FAILED_TAIL_LINES = 15  # lines of a failed launch's output shown after it
# an exception line, optionally behind torchrun's "[rankN]:" prefix: "RuntimeError: ...",
# "torch.OutOfMemoryError: ...", "KeyboardInterrupt"
_ERROR_LINE = re.compile(r"^(\[rank\d+\]:\s*)?(\w+\.)*\w*(Error|Exception|Interrupt)\b")


def failure_excerpt(log: Path, lines: int = FAILED_TAIL_LINES) -> tuple[list[str], str]:
    """What a failed launch's log says about why: its last ``lines`` non-blank lines before
    torchrun's own report (the launcher's ``ChildFailedError`` traceback and banner, which
    say only that a rank failed), then the banner's rank and exit code in one line; and the
    one line for a table (the ranks' last exception line, else the last line)."""
    text = log.read_text(encoding="utf-8", errors="replace").splitlines()
    cut = next((i for i, ln in enumerate(text) if "ChildFailedError" in ln), None)
    summary = []
    if cut is not None:
        tracebacks = [i for i in range(cut) if text[i].startswith("Traceback (most recent call last)")]
        start = tracebacks[-1] if tracebacks else cut
        fields = (ln.split(":", 1) for ln in text[cut:] if " : " in ln)
        banner = {key.strip(): value.strip() for key, value in fields}
        if "exitcode" in banner:
            summary = [f"torchrun: rank {banner.get('rank', '?')} failed, exitcode {banner['exitcode']}"]
        text = text[:start]
    kept = [ln for ln in text if ln.strip()]
    errors = [ln.strip() for ln in kept if _ERROR_LINE.search(ln.strip())]
    headline = errors[-1] if errors else (kept[-1].strip() if kept else (summary or ["(no output)"])[0])
    return kept[-lines:] + summary, headline


def run_sweep(
    nproc: int,
    fixed: dict[str, Any],
    grid: dict[str, list[Any]],
    log_dir: Path | None = None,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Run every configuration; return one record per configuration with its outcome.

    Each launch's output goes to ``log_dir/config<i>.log`` (without ``log_dir``: a temporary
    folder, where only the logs of failed launches are kept). A failed launch's last
    ``FAILED_TAIL_LINES`` lines are printed right after it, with the log's path (in its record
    as ``"log"``, and the line that says why as ``"why"``)."""
    console = console or Console()
    keep_all = log_dir is not None
    logs = log_dir if log_dir is not None else Path(tempfile.mkdtemp(prefix="lossy_sweep_logs_"))
    records = []
    combos = expand_grid(grid) or [{}]
    with Progress(
        TextColumn("[bold]sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[current]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("sweep", total=len(combos), current="")
        for i, combo in enumerate(combos):
            settings = {**fixed, **combo}
            rounds = int(settings.get("lab_round", 5))
            argv = flags_for(settings)
            label = " ".join(f"{k}={v}" for k, v in combo.items())
            progress.update(task, current=label)
            run_dir, error = run_dir_for(argv, nproc)
            record = {"settings": combo, "run_dir": str(run_dir) if run_dir else None}
            if run_dir is None:
                record["outcome"] = f"invalid flags ({error})"
            elif (done := _outcome(run_dir, rounds)) in ("finished", "diverged"):
                record["outcome"] = f"skipped ({done})"
            else:
                logs.mkdir(parents=True, exist_ok=True)
                log_path = logs / f"config{i:03d}.log"
                with open(log_path, "w") as log:
                    code = launch_train([*argv, "--resume"], nproc, log).returncode
                record["outcome"] = f"failed (exit {code})" if code else _outcome(run_dir, rounds)
                excerpt: list[str] = []
                if code:
                    excerpt, record["why"] = failure_excerpt(log_path)
                    record["log"] = str(log_path)
                elif not keep_all:
                    log_path.unlink()
            console.print(f"[{i + 1}/{len(combos)}] {label or '(fixed flags)'}: {record['outcome']}")
            if "log" in record:
                console.print("\n".join(f"    {ln}" for ln in excerpt), markup=False, highlight=False)
                console.print(f"    (the whole output: {record['log']})", markup=False, highlight=False)
            records.append(record)
            progress.advance(task)
    if not keep_all and not any(logs.iterdir()):  # nothing failed: no temporary folder left behind
        logs.rmdir()
    return records


def _load_config(path: str) -> dict[str, Any]:
    if path.endswith(".toml"):
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        description="Run a grid of train_ddp.py configurations with torchrun.",
        usage="%(prog)s [--config FILE] [--nproc N] [--grid FLAG=V1,V2 ...] [--log_dir DIR] "
        "[-- TRAIN_DDP_FLAGS ...]",
        epilog="Everything after a lone '--' is passed to every train_ddp.py run as fixed flags "
        "(e.g. -- --dataset digits --model resnet18 --use_avg); train_ddp.py's own flags are "
        "listed by 'python train_ddp.py --help'. A configuration whose flags train_ddp.py "
        "rejects is reported with train_ddp.py's message and not launched.",
    )
    p.add_argument("--config", help="TOML or JSON file with nproc, fixed and grid")
    p.add_argument("--nproc", type=int, default=None, help="ranks per configuration (>= 1; default 2)")
    p.add_argument(
        "--grid",
        nargs="*",
        default=[],
        metavar="FLAG=V1,V2",
        help="grid axes, e.g. loss_rate=0,0.1 drop_point=worker,post",
    )
    p.add_argument(
        "--log_dir",
        default=None,
        help="keep each launch's output here (default: a temporary folder keeping failed launches' logs)",
    )
    args = p.parse_args(argv)
    spec = _load_config(args.config) if args.config else {}
    nproc = args.nproc or int(spec.get("nproc", 2))
    if nproc < 1:
        p.error(f"--nproc must be >= 1, got {nproc}")
    grid = {k: list(v) for k, v in spec.get("grid", {}).items()}
    for item in args.grid:
        if "=" not in item:
            p.error(f"--grid entries look like flag=v1,v2; got {item!r}")
        key, values = item.split("=", 1)
        grid[key.lstrip("-")] = [_parse_value(v) for v in values.split(",")]
    fixed = dict(spec.get("fixed", {})) | parse_fixed(extra)
    console = Console()
    records = run_sweep(nproc, fixed, grid, Path(args.log_dir) if args.log_dir else None, console)
    table = Table(title=f"sweep: {len(records)} configurations")
    for col in ("settings", "outcome", "folder"):
        table.add_column(col)
    for r in records:
        outcome = r["outcome"]
        if "log" in r:  # the line that says why, and where the rest is
            outcome += f": {r['why']}\nlog: {r['log']}"
        table.add_row(
            escape(" ".join(f"{k}={v}" for k, v in r["settings"].items())),
            escape(outcome),  # log text is not markup: "[rank0]:" stays, "[/x]" cannot break the table
            Path(r["run_dir"]).name if r["run_dir"] else "-",
        )
    console.print(table)
    failed = [r for r in records if r["outcome"].startswith(("failed", "invalid"))]
    diverged = [r for r in records if "diverged" in r["outcome"]]
    console.print(
        f"{len(records) - len(failed)} ran or were skipped, {len(diverged)} diverged, {len(failed)} failed"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

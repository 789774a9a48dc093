"""Several runs of the study script in one process launch.

A launch of train_ddp.py costs a process start (~4.5 s of imports: torch, torchvision,
matplotlib) per rank, plus torchrun's own; the runs the tests make are small, so those starts
were most of the script tests' time. ``lossy_hooks.study.train.main`` builds its process group
and destroys it at the end, so one process (world size 1), or one group of W processes, can
call it once per command line, in order: :func:`run_batch` does that and returns each run's
exit code and output, as a separate launch would.

A module's tests declare the runs they read (:func:`uses`); :class:`SharedRuns` makes, on first
use, every run that the selected tests of the module need, in one launch per world size (so
``-k one_test`` makes only that test's runs). Runs that must be processes of their own (killed
or stopped at a fault point) stay separate ("before" steps).

:class:`WarmLauncher` stands in for ``launch_train`` where a tool launches configurations one
after another (the experiments, the local sweep): its workers stay up between launches.

Run as a script it is the worker: ``python study_batch.py --serve`` (a WarmLauncher's: jobs as
JSON lines on stdin), or ``python study_batch.py JOBS.json RESULTS.json``, JOBS a list
of ``{"argv": [...], "port": int | None, "snapshot": path | None, "cwd": path | None}``;
``snapshot`` copies the run's ``--output_dir`` there after the run (what a later run of the
batch overwrites); ``cwd`` is the working folder of that run (the default ``--output_dir``,
``runs``, is relative to it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve()


def _run_job(train: Callable[[list[str]], int], job: dict[str, Any]) -> dict[str, Any]:
    """One run of train.main in this process, as a launch of its own would make it."""
    if job.get("port") is not None:  # each run's group on its own port
        os.environ["MASTER_PORT"] = str(job["port"])
    os.chdir(job.get("cwd") or ROOT)
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = train(job["argv"])
        except SystemExit as e:  # argparse's errors: exit 2, the message on stderr
            code = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except BaseException:
            # an exception on one rank would leave the others waiting in a collective:
            # report it and end every rank (the launcher ends the others)
            sys.__stderr__.write(f"run {job['argv']} raised:\n{traceback.format_exc()}")
            sys.__stderr__.flush()
            os._exit(1)
    if job.get("snapshot") and int(os.environ.get("RANK", "0")) == 0:
        out_dir = Path(job["argv"][job["argv"].index("--output_dir") + 1])
        shutil.copytree(out_dir, job["snapshot"])
    return {
        "code": code,
        "stdout": out.getvalue(),
        "stderr": err.getvalue(),
        "seconds": time.monotonic() - start,
    }


def _worker(jobs_path: str, results_path: str) -> int:
    from lossy_hooks.study.train import main as train

    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))  # as torchrun: threads
    results = [_run_job(train, job) for job in json.loads(Path(jobs_path).read_text())]
    if int(os.environ.get("RANK", "0")) == 0:
        Path(results_path).write_text(json.dumps(results))
    return 0


RESULT = "@@study-batch-result@@ "


def _serve() -> int:
    """Jobs as JSON lines on stdin, each result as a line starting with RESULT on stdout."""
    from lossy_hooks.study.train import main as train

    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))
    for line in sys.stdin:
        result = _run_job(train, json.loads(line))
        sys.__stdout__.write(RESULT + json.dumps(result) + "\n")
        sys.__stdout__.flush()
    return 0


def _free_ports(n: int) -> list[int]:
    from lossy_hooks.core.process_group import free_port

    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def base_env() -> dict[str, str]:
    """The environment of a launch: one thread per process, this checkout on the path, no
    launcher variables from outside."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def rank_env(rank: int, world: int) -> dict[str, str]:
    """The environment of rank ``rank`` of ``world`` (as torchrun sets it; none at world size 1)."""
    env = base_env()
    if world > 1:
        env |= {
            "MASTER_ADDR": "127.0.0.1",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
        }
    return env


def run_batch(
    argvs: list[list[str]],
    world: int,
    work: Path,
    snapshots: list[str | None] | None = None,
    cwds: list[str | None] | None = None,
) -> list[dict[str, Any]]:
    """Run train_ddp.py with each of ``argvs`` in turn, in one process (``world`` 1, as
    ``python train_ddp.py``) or one group of ``world`` Gloo ranks on this machine (as
    ``torchrun --nproc_per_node=world``). Returns ``{"code", "stdout", "stderr", "seconds"}``
    per run (rank 0's output)."""
    work.mkdir(parents=True, exist_ok=True)
    ports = _free_ports(len(argvs)) if world > 1 else [None] * len(argvs)
    snapshots = snapshots or [None] * len(argvs)
    cwds = cwds or [None] * len(argvs)
    jobs = [
        {"argv": a, "port": p, "snapshot": s, "cwd": c}
        for a, p, s, c in zip(argvs, ports, snapshots, cwds, strict=True)
    ]
    jobs_path, results_path = work / "jobs.json", work / "results.json"
    jobs_path.write_text(json.dumps(jobs))
    procs = []
    for rank in range(world):
        env = rank_env(rank, world)
        log = open(work / f"rank{rank}.log", "w")  # closed below
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(jobs_path), str(results_path)],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    deadline = time.monotonic() + 600 + 120 * len(argvs)
    try:
        while any(p.poll() is None for p, _ in procs):
            failed = [p for p, _ in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break  # one rank failed (the others may wait for it in a collective)
            time.sleep(0.1)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            log.close()
    codes = [p.returncode for p, _ in procs]
    if any(codes):
        logs = "\n----\n".join((work / f"rank{r}.log").read_text()[-6000:] for r in range(world))
        raise RuntimeError(f"batch of {len(argvs)} runs at W={world}: ranks exited {codes}:\n{logs}")
    return json.loads(results_path.read_text())


class WarmLauncher:
    """A stand-in for ``lossy_hooks.study.sweeping.launch.launch_train`` (what the
    experiments' ``run_config`` launches each configuration with): the first launch at
    ``nproc`` ranks starts ``nproc`` worker processes that stay up, and each launch sends them
    its command line (train.main runs in each, its group on a fresh port). Same flags, same
    main; only the process start is paid once. ``close()`` ends the workers."""

    def __init__(self, work: Path, timeout: float = 600) -> None:
        self.work, self.timeout = work, timeout
        self.groups: dict[int, list[tuple[subprocess.Popen, queue.Queue, Any]]] = {}
        self.launches: list[list[str]] = []

    def _start(self, nproc: int) -> list[tuple[subprocess.Popen, queue.Queue, Any]]:
        self.work.mkdir(parents=True, exist_ok=True)
        group = []
        for rank in range(nproc):
            log = open(self.work / f"w{nproc}-rank{rank}.log", "w")  # closed in close()
            proc = subprocess.Popen(
                [sys.executable, str(WORKER), "--serve"],
                env=rank_env(rank, nproc) if nproc > 1 else base_env(),
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            lines: queue.Queue = queue.Queue()

            def read(stream=proc.stdout, lines=lines, log=log) -> None:
                for line in stream:
                    if line.startswith(RESULT):
                        lines.put(json.loads(line[len(RESULT) :]))
                    else:  # output a library wrote outside Python's sys.stdout
                        log.write(line)
                lines.put(None)  # the worker ended

            threading.Thread(target=read, daemon=True).start()
            group.append((proc, lines, log))
        self.groups[nproc] = group
        return group

    def __call__(self, argv: list[str], nproc: int, log: Any = None) -> subprocess.CompletedProcess:
        self.launches.append(list(argv))
        group = self.groups.get(nproc) or self._start(nproc)
        job = {"argv": argv, "port": _free_ports(1)[0] if nproc > 1 else None, "cwd": os.getcwd()}
        for proc, _, _ in group:
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
        results = []
        for _, lines, _ in group:
            try:
                result = lines.get(timeout=self.timeout)
            except queue.Empty:
                result = None
            if result is None:
                self.close()
                logs = "\n----\n".join(
                    (self.work / f"w{nproc}-rank{r}.log").read_text()[-6000:] for r in range(nproc)
                )
                raise RuntimeError(f"a warm worker of {nproc} ranks ended or hung on {argv}:\n{logs}")
            results.append(result)
        code = next((r["code"] for r in results if r["code"]), 0)
        out, err = results[0]["stdout"], results[0]["stderr"]
        if log is not None:
            log.write(out + err)
            return subprocess.CompletedProcess(argv, code)
        return subprocess.CompletedProcess(argv, code, out, err)

    def close(self) -> None:
        for group in self.groups.values():
            for proc, _, _ in group:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            for proc, _, log in group:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()
        self.groups = {}


def uses(*names: str) -> Callable:
    """Decorator: the test reads the shared runs ``names``."""

    def mark(fn: Callable) -> Callable:
        fn.shared_runs = names
        return fn

    return mark


@dataclass
class Run:
    """One run of the script: ``world`` ranks, its flags (``--output_dir`` added: the run's
    own folder unless ``out`` names another run's, to resume or overwrite it; with
    ``in_folder`` no ``--output_dir``, the run's working folder is its own folder instead),
    ``after`` the before-step that must have run first, ``snapshot`` to keep its folder as it
    was."""

    world: int
    flags: Callable[[dict[str, Any]], list[str]]
    out: str | None = None
    after: str | None = None
    snapshot: bool = False
    needs: tuple[str, ...] = ()  # other runs it needs (made first, in the same batch)
    in_folder: bool = False


@dataclass
class SharedRuns:
    """The runs of one test module, made on first use: ``before`` steps (callables, each its
    own launch or in-process check, given this object) in declaration order, then one batch per
    world size holding every needed run in declaration order."""

    root: Path
    context: dict[str, Any]
    runs: dict[str, Run]
    before: dict[str, Callable[[SharedRuns], Any]]
    wanted: set[str]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    _made: bool = False

    def out(self, name: str) -> Path:
        """The ``--output_dir`` of run (or before-step) ``name``."""
        run = self.runs.get(name)
        return self.root / (run.out if run and run.out else name)

    def snapshot(self, name: str) -> Path:
        return self.root / f"{name}.snapshot"

    def make(self) -> None:
        if self._made:
            return
        self._made = True
        needed: set[str] = set()
        todo = [n for n in self.runs if n in self.wanted]
        while todo:
            n = todo.pop()
            if n not in needed:
                needed.add(n)
                todo += list(self.runs[n].needs)
        steps = {self.runs[n].after for n in needed if self.runs[n].after} | (self.wanted & set(self.before))
        for name, step in self.before.items():
            if name in steps:
                self.facts[name] = step(self)
        for world in sorted({self.runs[n].world for n in needed}):
            names = [n for n in self.runs if n in needed and self.runs[n].world == world]
            argvs, cwds = [], []
            for n in names:
                run = self.runs[n]
                argvs.append(
                    [*run.flags(self.context), *([] if run.in_folder else ["--output_dir", str(self.out(n))])]
                )
                cwds.append(str(self.out(n)) if run.in_folder else None)
                if run.in_folder:
                    self.out(n).mkdir(parents=True, exist_ok=True)
            snaps = [str(self.snapshot(n)) if self.runs[n].snapshot else None for n in names]
            results = run_batch(argvs, world, self.root / f"batch-w{world}", snaps, cwds)
            self.results |= dict(zip(names, results, strict=True))

    def result(self, name: str) -> dict[str, Any]:
        self.make()
        return self.results[name]

    def fact(self, name: str) -> Any:
        self.make()
        return self.facts[name]


def wanted_runs(request: Any) -> set[str]:
    """The shared runs (and before-steps) the selected tests of ``request``'s module use."""
    names: set[str] = set()
    for item in request.session.items:
        if getattr(item, "module", None) is request.module:
            names |= set(getattr(getattr(item, "function", None), "shared_runs", ()))
    return names


if __name__ == "__main__":
    sys.exit(_serve() if sys.argv[1:] == ["--serve"] else _worker(sys.argv[1], sys.argv[2]))

"""Start a script as W Gloo ranks on this machine and collect what rank 0 writes.

Each process group launch costs ~10-20 s here (importing torch), so tests run many checks
per launch: the worker script runs a list of scenarios and rank 0 writes all ranks'
results as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lossy_hooks.core.process_group import free_port

__all__ = ["ROOT", "free_port", "launch", "run_scenarios", "worker_main"]

ROOT = Path(__file__).resolve().parent.parent


def launch(script: Path, world_size: int, args: list[str], out: Path, timeout: float = 600) -> Any:
    """Run ``script args`` as ``world_size`` ranks; return the JSON rank 0 wrote to ``out``."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(out), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=timeout)
            logs.append(stdout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    if any(codes):
        raise RuntimeError(f"ranks exited {codes}:\n" + "\n----\n".join(logs))
    return json.loads(out.read_text())


def run_scenarios(scenarios: dict[str, Any], names: list[str], out_path: str) -> None:
    """In a worker rank, with its process group up: run the named scenarios, gather every
    rank's results on rank 0, which writes them to ``out_path`` as JSON; then shut down."""
    import gc

    import torch.distributed as dist

    results = {name: scenarios[name]() for name in names}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(out_path, "w") as fh:
            json.dump(gathered, fh)
    gc.collect()
    dist.barrier()  # stopped rare aborts at exit
    dist.destroy_process_group()


def worker_main(scenarios: dict[str, Any]) -> None:
    """The ``main`` of a worker script: ``script.py OUT.json SCENARIO [...]`` as one rank of a
    Gloo group (rank and world from the environment launch() sets)."""
    import sys

    import torch
    import torch.distributed as dist

    out_path, names = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    run_scenarios(scenarios, names, out_path)

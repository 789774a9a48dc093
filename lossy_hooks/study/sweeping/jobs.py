"""A configuration's run as a scheduler job (``sweep --executor slurm | submitit-local``), through
submitit (the ``cluster`` extra).

Each configuration is one job of ``nodes × tasks_per_node`` tasks, one rank per task (one per
GPU with ``--gpus_per_node G``, else ``--nproc`` per node): :class:`TrainJob` runs the study
script in every task with the distributed environment submitit exports (``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), always with
``--resume``. Preemption or the time limit (SLURM signals ``USR2`` ``signal_delay_s`` before
it) calls submitit's checkpoint hook, :meth:`TrainJob.checkpoint`, which requeues the same
run: it continues from the last finished epoch's checkpoint. A sweep's configurations go to
SLURM as one job array.

``submitit-local`` runs the same jobs as local processes (submitit's ``LocalExecutor``: one
node, its job id the PID of the process that supervises the tasks).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lossy_hooks.study.extras import require
from lossy_hooks.study.run_control import pid_alive

__all__ = [
    "EXECUTORS",
    "SUBMITIT_EXECUTORS",
    "ClusterResources",
    "TrainJob",
    "job_log_paths",
    "make_executor",
    "parse_slurm_time",
    "submitit_job_active",
]

EXECUTORS = ("local", "slurm", "submitit-local")
SUBMITIT_EXECUTORS = ("slurm", "submitit-local")
LOCAL_TIME_MIN = 7 * 24 * 60  # submitit-local without --time: a week (submitit's default is 2 min)
JOB_NAME = "lossy_sweep"
# SLURM states of a job that may still run (sacct); any other state has ended
ACTIVE_SLURM_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "CONFIGURING",
    "COMPLETING",
    "SIGNALING",
    "STAGE_OUT",
}

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_slurm_time(text: str) -> int:
    """A SLURM time limit in whole minutes (rounded up): ``MM``, ``MM:SS``, ``HH:MM:SS``,
    ``D-HH``, ``D-HH:MM`` or ``D-HH:MM:SS``, as ``sbatch --time`` reads them. Raises
    ``ValueError`` for anything else or for zero."""
    m = _TIME.match(text.strip())
    if m is None:
        raise ValueError(f"--time must look like MM, HH:MM:SS or D-HH:MM:SS, got {text!r}")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is None:  # MM | MM:SS | HH:MM:SS
        seconds = a * 60 if b is None else a * 60 + b if c is None else a * 3600 + b * 60 + c
    else:  # D-HH | D-HH:MM | D-HH:MM:SS
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if seconds <= 0:
        raise ValueError(f"--time must be > 0, got {text!r}")
    return -(-seconds // 60)


@dataclass(frozen=True)
class ClusterResources:
    """What each configuration's job asks for (the sweep's ``--nodes``, ``--gpus_per_node``,
    ``--nproc``, ``--partition``, ``--time``, ``--account``, ``--slurm_arg``).

    One rank per task: ``tasks_per_node = gpus_per_node`` with GPUs, else ``nproc``;
    the run's world size is ``nodes × tasks_per_node``."""

    nodes: int = 1
    gpus_per_node: int = 0
    nproc: int = 2
    partition: str | None = None
    time_min: int | None = None
    account: str | None = None
    slurm_args: tuple[tuple[str, str], ...] = ()

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node or self.nproc

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def check(self, executor: str) -> None:
        """Raise ``ValueError`` naming the flag for settings ``executor`` cannot run."""
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if self.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {self.nproc}")
        if executor == "local":
            given = [
                flag
                for flag, value, default in (
                    ("--nodes", self.nodes, 1),
                    ("--gpus_per_node", self.gpus_per_node, 0),
                    ("--partition", self.partition, None),
                    ("--time", self.time_min, None),
                    ("--account", self.account, None),
                    ("--slurm_arg", self.slurm_args, ()),
                )
                if value != default
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)} apply to a submitit executor: add --executor slurm "
                    "(or submitit-local); --executor local runs torchrun here with --nproc ranks"
                )
        if executor == "submitit-local" and self.nodes > 1:
            raise ValueError(
                f"--executor submitit-local runs on this one machine: --nodes must be 1, got {self.nodes}"
            )
        if executor == "slurm" and self.time_min is None:
            raise ValueError(
                "--executor slurm needs --time, the job's wall-clock limit (e.g. --time 4:00:00): "
                "a preempted or timed-out job is requeued and resumes from its last epoch"
            )

    def slurm_parameters(self) -> dict[str, Any]:
        """The parameters of submitit's ``SlurmExecutor.update_parameters`` (sbatch's options):
        nodes, tasks and GPUs per node, partition, time (minutes), account; each ``--slurm_arg
        KEY=VALUE`` as submitit's parameter ``KEY`` where it has one (``mem``, ``qos``,
        ``constraint``, ``cpus_per_task``, ``array_parallelism``, ...), else passed to sbatch as
        ``--KEY=VALUE`` (``additional_parameters``)."""
        submitit = require("cluster")
        params: dict[str, Any] = {
            "job_name": JOB_NAME,
            "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "time": self.time_min,
            "stderr_to_stdout": True,
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.partition:
            params["partition"] = self.partition
        if self.account:
            params["account"] = self.account
        known = submitit.SlurmExecutor._valid_parameters()
        extra: dict[str, str] = {}
        for key, value in self.slurm_args:
            if key.replace("-", "_") in known:
                params[key.replace("-", "_")] = _parse_number(value)
            else:
                extra[key] = value
        if extra:
            params["additional_parameters"] = extra
        return params

    def local_parameters(self) -> dict[str, Any]:
        """The parameters of submitit's ``LocalExecutor``: one node, the tasks, the GPUs, the time."""
        params: dict[str, Any] = {
            "tasks_per_node": self.tasks_per_node,
            "timeout_min": self.time_min or LOCAL_TIME_MIN,
            "stderr_to_stdout": True,
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        return params

    def with_slurm_args(self, items: list[str]) -> ClusterResources:
        """A copy with ``--slurm_arg KEY=VALUE`` items added (``ValueError`` naming a bad one)."""
        pairs = []
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--slurm_arg takes KEY=VALUE (e.g. qos=high), got {item!r}")
            pairs.append((key.strip().lstrip("-"), value.strip()))
        return dataclasses.replace(self, slurm_args=self.slurm_args + tuple(pairs))


def _parse_number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


def make_executor(executor: str, folder: Path, resources: ClusterResources) -> Any:
    """submitit's executor for ``executor`` ("slurm" or "submitit-local"), its jobs' files in
    ``folder/<job id>``, with ``resources``' parameters."""
    submitit = require("cluster")
    folder = Path(folder) / "%j"
    if executor == "slurm":
        ex = submitit.SlurmExecutor(folder=folder)
        ex.update_parameters(**resources.slurm_parameters())
    elif executor == "submitit-local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(**resources.local_parameters())
    else:
        raise ValueError(f"--executor must be one of {', '.join(SUBMITIT_EXECUTORS)} here, got {executor!r}")
    return ex


def job_log_paths(folder: Path, job_id: str, tasks: int) -> list[str]:
    """Where submitit writes the output of each task of a job (stderr joined to stdout)."""
    submitit = require("cluster")
    return [str(submitit.core.utils.JobPaths(Path(folder) / "%j", job_id, k).stdout) for k in range(tasks)]


def submitit_job_active(executor: str, job_id: str) -> tuple[bool | None, str]:
    """Whether a submitted job may still run, and its state as the scheduler says it: for
    SLURM from ``sacct`` (``None`` when sacct cannot say); for submitit-local whether the
    process supervising its tasks is alive."""
    if executor == "submitit-local":
        alive = pid_alive(int(job_id), (b"submitit",))  # the process supervising its tasks
        return alive, "RUNNING" if alive else "ENDED"
    submitit = require("cluster")
    try:  # forced: a fresh sacct call (the watcher's cache has no entry for a job not yet seen)
        state = submitit.SlurmJob.watcher.get_state(job_id, mode="force")
    except Exception as e:  # no sacct on this machine, or it failed
        return None, f"UNKNOWN ({type(e).__name__})"
    state = str(state).split()[0].upper()
    if state == "UNKNOWN":
        return None, state
    return state in ACTIVE_SLURM_STATES, state


class TrainJob:
    """The callable a job runs in each of its tasks: the study script with ``argv`` (which
    holds ``--resume``), as this task's rank. submitit calls :meth:`checkpoint` on
    preemption or timeout (its ``Checkpointable`` protocol)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = list(argv) if "--resume" in argv else [*argv, "--resume"]

    def __call__(self) -> int:
        submitit = require("cluster")
        # one rank per task; every GPU of the node stays visible (the rank picks LOCAL_RANK's)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        from lossy_hooks.study.train import main

        code = main(self.argv)
        if code:
            raise RuntimeError(f"train_ddp.py exited with code {code} (its message is above)")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's checkpoint hook: requeue the same run. Its ``--resume`` continues from
        the last finished epoch's checkpoint (the epoch in progress is redone)."""
        submitit = require("cluster")
        return submitit.helpers.DelayedSubmission(TrainJob(self.argv))

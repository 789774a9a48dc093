"""Packet-loss study: train a torchvision model with DDP while the gradient allreduce loses
packets (lossy_hooks), or a small GPT on text with DDP or FSDP2 (lossy reduce-scatter and
all-gather). Launch with torchrun (``-m lossy_hooks.study.train``, or ``--no-python
lossy-train``, or the top-level ``train_ddp.py``), or plainly for one process:

    torchrun --nproc_per_node=4 -m lossy_hooks.study.train --loss_rate 0.05 --worker_drop --use_avg
    torchrun --nproc_per_node=2 --no-python lossy-train --model gpt-tiny --strategy fsdp --use_avg
    python -m lossy_hooks.study.train --max_steps 50

The original study's flags keep their names, defaults and meanings (see README):
--worker_drop -> drop point "worker" (else "post"); --use_zero -> fill "zero" (else
"rescale"); --use_avg -> reduction "mean" (else "sum"); --accumulation_steps -> micro-batches
per optimizer step, accumulated under DDP's no_sync() so the hook fires once per step.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import sys

import torch.distributed as dist
import torchvision

from lossy_hooks.core.process_group import init_from_environment
from lossy_hooks.study.cli import prepare_run_dir, resolve
from lossy_hooks.study.flags import build_parser
from lossy_hooks.study.plotting import plot_summary
from lossy_hooks.study.progress import Reporter
from lossy_hooks.study.rounds import RoundRunner
from lossy_hooks.study.run_control import (
    acquire_lock,
    environment_info,
    release_lock,
    writer_refusal,
)
from lossy_hooks.study.run_io import (
    round_status,
    sim_clock_column,
    write_json,
    write_summary,
)
from lossy_hooks.study.workloads.data import build_datasets
from lossy_hooks.study.workloads.gpt import GPT_CONFIGS


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = resolve(args, parser)
    run_dir = prepare_run_dir(cfg, parser)
    rank, world, device = init_from_environment(cfg["backend"])
    report = Reporter(enabled=rank == 0)
    owns_lock = False
    aborted = False  # an exception or an exit (a requeue's SystemExit) is leaving main
    try:
        # one writer per configuration: refuse while another live process writes it
        refusal = [writer_refusal(run_dir) if rank == 0 else None]
        dist.broadcast_object_list(refusal, src=0)
        if refusal[0] is not None:
            if rank == 0:
                print(f"{parser.prog}: error: {refusal[0]}", file=sys.stderr)
            return 2
        if rank == 0:
            if cfg["overwrite"] and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            acquire_lock(run_dir)
            owns_lock = True
            saved = cfg | {"environment": environment_info(torchvision=torchvision.__version__)}
            write_json(run_dir / "config.json", saved)
        dist.barrier()
        if rank == 0 and cfg["download"]:
            build_datasets(cfg["dataset"], cfg["data_path"], True, cfg["imagenette_size"], rank=0)
        dist.barrier()
        block = GPT_CONFIGS[cfg["model"]].block_size if cfg["model"] in GPT_CONFIGS else 0
        data = build_datasets(
            cfg["dataset"], cfg["data_path"], False, cfg["imagenette_size"], rank, block, cfg["corpus_mb"]
        )
        report.print(
            f"{run_dir.name}: {cfg['model']} on {data.name} ({len(data.train)} train / {len(data.val)} val), "
            f"{world} rank(s) on {device} ({cfg['strategy']}), loss model {cfg['loss_model']} at "
            f"{cfg['drop_point']}, fill {cfg['fill']}, reduction {cfg['reduction']}"
        )
        if cfg["dataset_flag"] == "auto" and data.name == "digits":
            report.print("note: Imagenette not found under --data_path: using the packaged digits (offline)")
        statuses = []
        for k in range(cfg["lab_round"]):
            ended = round_status(run_dir / f"round{k}")
            if ended:
                statuses.append(ended)
                continue
            statuses.append(RoundRunner(cfg, run_dir, k, data, rank, world, device, report).run())
            gc.collect()
        if rank == 0:
            write_summary(run_dir, cfg["lab_round"], cfg.get("target_acc"), sim_clock_column(cfg))
            csvs = [run_dir / f"round{k}" / "metrics.csv" for k in range(cfg["lab_round"])]
            plot_summary([p for p in csvs if p.exists()], run_dir / "summary.png", run_dir.name)
            report.print(
                f"done: {statuses.count('finished')} finished, {statuses.count('diverged')} "
                f"diverged; results in {run_dir}"
            )
    except BaseException:
        aborted = True
        raise
    finally:
        if owns_lock:
            release_lock(run_dir)
        gc.collect()
        if dist.is_initialized():
            # a barrier only on a clean exit: leaving on an error (or a preempted job's
            # requeue), the other ranks may sit in another collective, and a barrier would
            # pair with it and hang until the timeout
            if not aborted:
                with contextlib.suppress(Exception):
                    dist.barrier()
                dist.destroy_process_group()
            else:
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

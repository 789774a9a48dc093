"""Benchmark of the lossy process group's cost per collective (run by hand, not in CI).

    python bench/bench_group.py                       # W = 2 and 4, Gloo on the CPU, 25 MiB
    python bench/bench_group.py --world 2 --mib 25 --reps 20 --out bench_group.json

Per world size, one launch of W ranks (Gloo, one thread per rank on CPU; NCCL on CUDA) and,
in it, the plain group (the world) and lossy groups wrapping it (``lossy_group``) at loss 0
and 10% (zero fill): a 25 MiB fp32 ``all_reduce`` and an ``all_to_all_single`` of the same
size (even splits).
Repetitions run the groups in a shuffled order each time; per configuration: the median
seconds per call, its ratio to the plain group, and the median and quartiles of the ratio
paired within each repetition (robust to the machine's drifts). Printed as a table and saved
as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import paired_ratios, start_worker
from lossy_hooks import LossyState, lossy_group
from lossy_hooks.core.process_group import free_port

LOSSES = {"loss 0": 0.0, "loss 10% zero": 0.1}


def call(kind: str, group: Any, tensor: torch.Tensor, out: torch.Tensor) -> None:
    if kind == "all_reduce":
        dist.all_reduce(tensor, group=group)
    else:
        dist.all_to_all_single(out, tensor, group=group)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, path: str) -> None:
    device = start_worker(rank, world, port, args.cpu)
    cuda = device.type == "cuda"
    groups: dict[str, Any] = {"plain": dist.group.WORLD}  # the group the lossy ones wrap
    for label, p in LOSSES.items():
        groups[label] = lossy_group(LossyState(loss_rate=p, fill="zero", mtu=args.mtu, seed=1))
    numel = args.mib * 2**20 // 4 // world * world
    tensor = torch.randn(numel, device=device)
    out = torch.empty_like(tensor)
    times: dict[str, list[float]] = {}
    order = list(groups)
    for rep in range(args.warmup + args.reps):
        random.Random(rep).shuffle(order)  # the same order on every rank
        for kind in ("all_reduce", "all_to_all"):
            for label in order:
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                call(kind, groups[label], tensor, out)
                if cuda:
                    torch.cuda.synchronize()
                if rep >= args.warmup:
                    times.setdefault(f"{kind} | {label}", []).append(time.perf_counter() - start)
    if rank == 0:
        Path(path).write_text(json.dumps(times))
    dist.barrier()
    dist.destroy_process_group()


def summarize(times: dict[str, list[float]], world: int) -> list[dict[str, Any]]:
    rows = []
    for key, seconds in times.items():
        kind, label = key.split(" | ")
        row = {"world": world, "collective": kind, "group": label}
        row["median_seconds"] = statistics.median(seconds)
        rows.append(row | paired_ratios(seconds, times[f"{kind} | plain"]))
    return rows


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--mib", type=int, default=25)
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="Gloo on the CPU even with GPUs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for world in args.world:
        path = f"/tmp/bench_group_{os.getpid()}_{world}.json"
        mp.spawn(worker, args=(world, free_port(), args, path), nprocs=world, join=True)
        rows += summarize(json.loads(Path(path).read_text()), world)
    print(f"{'W':>2} {'collective':<11} {'group':<14} {'median s':>9} {'ratio':>6} {'paired [q1, q3]':>22}")
    for r in rows:
        print(
            f"{r['world']:>2} {r['collective']:<11} {r['group']:<14} {r['median_seconds']:>9.4f} "
            f"{r['ratio_of_medians']:>6.3f} {r['paired_ratio_median']:>7.3f} "
            f"[{r['paired_ratio_q1']:.3f}, {r['paired_ratio_q3']:.3f}]"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

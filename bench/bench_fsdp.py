"""Benchmark of the lossy FSDP2 collectives' cost (run by hand, not in CI).

    python bench/bench_fsdp.py                          # gpt-small, 2 Gloo ranks on the CPU
    python bench/bench_fsdp.py --model gpt-tiny --reps 10 --out bench_fsdp.json

FSDP2 training steps (forward, backward, AdamW) of a GPT on W ranks (Gloo with one thread
per rank on CPU, NCCL on CUDA), one fully_shard model per configuration, all from the same
initial weights: plain FSDP2 (the reference), and the lossy reduce-scatter / all-gather in
several settings. Repetitions run the configurations in a shuffled order each time; per
configuration: the median step time, its ratio to plain FSDP2, and the median and quartiles
of the ratio paired within each repetition (robust to the machine's drifts). Printed as a
table and saved as JSON (``--out``).
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
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import paired_ratios, start_worker
from lossy_hooks import LossyState, fsdp
from lossy_hooks.core.process_group import free_port
from lossy_hooks.study.parallel import shard_units
from lossy_hooks.study.workloads.gpt import build_gpt

# label -> (reduce-scatter state kwargs or None, all-gather state kwargs or None)
CONFIGS: dict[str, tuple[dict[str, Any] | None, dict[str, Any] | None]] = {
    "plain FSDP2": (None, None),
    "loss 0 (counting)": (dict(loss_rate=0.0), None),
    "worker 10% zero": (dict(loss_rate=0.1, fill="zero"), None),
    "worker 10% rescale (regenerate)": (dict(loss_rate=0.1, counts_transport="regenerate"), None),
    "worker 10% rescale (separate)": (dict(loss_rate=0.1, counts_transport="separate"), None),
    "post 10% rescale": (dict(loss_rate=0.1, drop_point="post"), None),
    "all-gather 1% stale": (None, dict(loss_rate=0.01)),
    "worker 10% + all-gather 1%": (dict(loss_rate=0.1), dict(loss_rate=0.01)),
}


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    device = start_worker(rank, world, port, args.cpu)
    cuda = device.type == "cuda"
    models = {}
    for label, (scatter, gather) in CONFIGS.items():
        torch.manual_seed(0)
        model = build_gpt(args.model).to(device)
        state = LossyState(mtu=args.mtu, **scatter) if scatter is not None else None
        ag = fsdp.gather_state(mtu=args.mtu, **gather) if gather is not None else None
        for unit in shard_units(model):
            fully_shard(unit)
        fully_shard(model)
        if state is not None or ag is not None:  # else plain FSDP2, the reference
            fsdp.register(model, state, all_gather=ag)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        models[label] = (model, opt)
    block = models["plain FSDP2"][0].cfg.block_size
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, 256, (args.batch_size, block), generator=g).to(device)

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for model, opt in models.values():  # warm-up
        step(model, opt)
    times: dict[str, list[float]] = {label: [] for label in CONFIGS}
    order = list(CONFIGS)
    rng = random.Random(0)  # the same order on every rank
    for _ in range(args.reps):
        rng.shuffle(order)
        for label in order:
            model, opt = models[label]
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(model, opt)
            if cuda:
                torch.cuda.synchronize()
            times[label].append((time.perf_counter() - t0) / args.steps)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, times)
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(gathered, fh)
    dist.barrier()
    dist.destroy_process_group()


def summarize(per_rank: list[dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Per configuration: the slowest rank's time per repetition (a step ends when every rank
    has finished it), its median, and the ratio to plain FSDP2 paired by repetition."""
    reps = len(per_rank[0]["plain FSDP2"])
    slowest = {label: [max(r[label][i] for r in per_rank) for i in range(reps)] for label in per_rank[0]}
    base = slowest["plain FSDP2"]
    rows = []
    for label, ts in slowest.items():
        rows.append({"config": label, "median_ms": 1e3 * statistics.median(ts)} | paired_ratios(ts, base))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt-small", help="gpt-tiny, gpt-small or gpt-medium")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--world_size", type=int, default=2)
    p.add_argument("--reps", type=int, default=12, help="repetitions (shuffled order each)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration per repetition")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--cpu", action="store_true", help="force CPU/Gloo even where CUDA exists")
    p.add_argument("--out", default="bench_fsdp.json")
    args = p.parse_args()
    raw = args.out + ".ranks"
    mp.spawn(worker, args=(args.world_size, free_port(), args, raw), nprocs=args.world_size)
    with open(raw) as fh:
        rows = summarize(json.load(fh))
    os.remove(raw)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    print(
        f"{args.model}, batch {args.batch_size}, {args.world_size} ranks on {device}, {args.reps} repetitions"
    )
    print(f"{'config':34s} {'median ms':>10s} {'ratio':>7s} {'paired (q1-q3)':>22s}")
    for r in rows:
        print(
            f"{r['config']:34s} {r['median_ms']:10.1f} {r['ratio_of_medians']:7.3f} "
            f"{r['paired_ratio_median']:8.3f} ({r['paired_ratio_q1']:.3f}-{r['paired_ratio_q3']:.3f})"
        )
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "device": device, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()

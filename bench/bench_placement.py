"""Benchmark of the per-hop placements' mask cost (run by hand, not in CI).

    python bench/bench_placement.py                       # CPU, 1 thread, a 25 MiB bucket
    python bench/bench_placement.py --device cuda --worlds 8 64 512

What a rank of a per-hop placement does per bucket on top of the real allreduce: draw every
lossy hop of both phases, the survival by pointer doubling, its own masks, the arrival counts,
the broadcast rescale factors, the per-link counts (``HopLoss.masks``, as the hook calls it),
for each algorithm and world size. The masks depend on ``W`` but not on the processes: the
work is the same on every rank, so a world of ``W`` ranks is measured as rank 0 of ``W`` in
one process (W = 2..8 as here, and simulated W beyond). Against: the parameter server's draw
of the same bucket (one ``rand`` per phase) and one ``copy_`` of the bucket (the memory
floor). And the clock per hop (``SimClock.tick`` with a fixed 1.5x deadline on a jittery,
straggling, dropping network: every hop's delays, resends, step maxima, late masks), beside
the ``ps`` clock's tick. The median of ``--reps`` calls after one warm-up; JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lossy_hooks.core.netclock import SimClock
from lossy_hooks.core.network import NetworkModel
from lossy_hooks.core.placement import HopLoss, LinkRules, placement_of
from lossy_hooks.loss_models import Bernoulli
from lossy_hooks.loss_models.deadline import Deadline

NETWORK = NetworkModel(jitter="lognormal 3.9 0.5", straggler_prob=0.02, straggler_factor=3, drop_rate=1e-4)

ALGORITHMS = ("ring", "tree", "dbtree", "direct")


def timed(fn, reps: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4, 5, 8, 64, 256, 1024])
    p.add_argument("--bucket_mb", type=float, default=25.0)
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--loss_rate", type=float, default=0.01)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("docs/bench/cpu_placements.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    numel = int(args.bucket_mb * 2**20 / 4)
    packets = -(-numel * 4 // args.mtu)
    bucket = torch.randn(numel, device=device)
    copy = torch.empty_like(bucket)
    floor = timed(lambda: copy.copy_(bucket), args.reps, device)
    gen = torch.Generator(device=device).manual_seed(0)
    ps = timed(
        lambda: [torch.rand(packets, generator=gen, device=device) < args.loss_rate for _ in range(2)],
        args.reps,
        device,
    )
    nbytes = numel * 4.0

    def tick_seconds(algorithm: str, world: int) -> float:
        clock = SimClock(NETWORK, Deadline(1.5, True), placement_of(algorithm))
        clock.prepare(device, 0, world)
        return timed(lambda: clock.tick(packets, nbytes, args.mtu), args.reps, device)

    rows = []
    head = f"bucket {args.bucket_mb:g} MiB = {packets} packets; copy_ {floor * 1e3:.3f} ms"
    print(f"{head}; ps draw {ps * 1e3:.3f} ms")
    print(f"{'algorithm':>9} {'W':>5} {'ms':>9} {'x copy_':>8} {'clock ms':>9}")
    for world in args.worlds:
        clock = tick_seconds("ps", world)
        rows.append({"algorithm": "ps", "world": world, "clock_ms": clock * 1e3})
        print(f"{'ps':>9} {world:>5} {'':>9} {'':>8} {clock * 1e3:9.3f}")
    for algorithm in ALGORITHMS:
        for world in args.worlds:
            hops = HopLoss(
                placement_of(algorithm), Bernoulli(args.loss_rate), LinkRules(), ("reduce", "broadcast")
            )
            hops.prepare(device, 0, 0, world)
            seconds = timed(lambda h=hops: h.masks(packets, True, True, device), args.reps, device)
            clock = tick_seconds(algorithm, world)
            rows.append(
                {
                    "algorithm": algorithm,
                    "world": world,
                    "ms": seconds * 1e3,
                    "x_copy": seconds / floor,
                    "clock_ms": clock * 1e3,
                }
            )
            print(f"{algorithm:>9} {world:>5} {seconds * 1e3:9.3f} {seconds / floor:8.2f} {clock * 1e3:9.3f}")
    out = {
        "device": str(device),
        "bucket_mb": args.bucket_mb,
        "packets": packets,
        "loss_rate": args.loss_rate,
    }
    out |= {"copy_ms": floor * 1e3, "ps_draw_ms": ps * 1e3, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

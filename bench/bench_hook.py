"""Benchmark of the lossy hook's cost (run by hand, not in CI).

    python bench/bench_hook.py                      # both parts, CPU/Gloo, 2 ranks
    python bench/bench_hook.py --part alone         # the hook's tensor work on a 25 MiB bucket
    python bench/bench_hook.py --part step --models resnet18 --batch_sizes 16 1
    python bench/bench_hook.py --part hadamard      # the rotation's cost per block size

Part "alone": time to packetize, draw the loss mask and apply it to a 25 MiB bucket, for
every loss model, fp32 and fp16, against one ``copy_`` of that bucket (the memory-bandwidth
floor), in the same process; plus the bytes the work allocates (profiler on CPU,
``max_memory_allocated`` on CUDA).

Part "step": DDP training-step time on W ranks (Gloo on CPU with 1 thread per rank, NCCL on
CUDA), one DDP model per configuration, all built from the same initial weights, timed in
repetitions whose order is shuffled each time. Per configuration: the median step time and
its ratio to PyTorch's built-in ``allreduce_hook``; the median and quartiles of the ratio
paired within each repetition; the host time spent in the hook's body and result callback
per step, and the step ratio that implies (low-noise; see docs/performance.md); and the bytes
a step allocates beyond the ``allreduce_hook`` step.
Part "hadamard": encoding and decoding one bucket (``--hadamard_numel`` fp32 elements, default
ResNet-18's 11.2M) at each block size of ``--hadamard_blocks``, against one ``copy_`` of it,
and the padding each block size sends (one thread on CPU, as the step part).
Results are printed as tables and saved as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import start_worker
from lossy_hooks import LossyState, lossy_allreduce_hook, parse_loss_model
from lossy_hooks.core.packetization import PacketLayout
from lossy_hooks.core.process_group import free_port
from lossy_hooks.core.techniques.hadamard import decode_, encode, padded_numel

MODELS = {
    "random 10%": "random 10%",
    "exact 10%": "exact 10%",
    "tail 10%": "tail 10%",
    "gemodel 2% 20%": "gemodel 2% 20%",
    "state 2% 30% 10% 50% 1%": "state 2% 30% 10% 50% 1%",
}


def timer(device: torch.device):
    if device.type == "cuda":

        def run(fn, reps: int) -> list[float]:
            out = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                out.append(a.elapsed_time(b) / 1e3)
            return out
    else:

        def run(fn, reps: int) -> list[float]:
            out = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
            return out

    return run


def allocated_bytes(fn, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # self (exclusive) allocations: an op's inclusive figure also counts its children's
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def bench_hadamard(device: torch.device, numel: int, blocks: list[int], reps: int) -> list[dict]:
    """Median seconds to encode (signs, padded fp32 copy, forward transform) and to decode
    (inverse transform, signs, copy into the bucket) one fp32 bucket of ``numel`` elements
    at each block size, with the median of one ``copy_`` of the bucket in the same loop."""
    run = timer(device)
    bucket = torch.randn(numel, device=device)
    out = torch.empty_like(bucket)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for block in blocks:
        y, words = encode(bucket, block, gen)
        spare = torch.empty_like(y)
        enc, dec, copy = [], [], []
        for _ in range(reps):
            enc += run(lambda block=block: encode(bucket, block, gen), 1)
            spare.copy_(y)  # decode overwrites what it is given
            dec += run(lambda b=block, w=words, y2=spare: decode_(out, y2, w, b), 1)
            copy += run(lambda: out.copy_(bucket), 1)
        med = {k: statistics.median(v) for k, v in (("encode", enc), ("decode", dec), ("copy", copy))}
        rows.append(
            {
                "block": block,
                "numel": numel,
                "padded_elements": padded_numel(numel, block) - numel,
                "encode_seconds": med["encode"],
                "decode_seconds": med["decode"],
                "copy_seconds": med["copy"],
                "ratio_to_copy": (med["encode"] + med["decode"]) / med["copy"],
            }
        )
    return rows


def bench_alone(device: torch.device, mtu: int, reps: int, world: int = 2) -> list[dict]:
    """The hook's own tensor work on one 25 MiB bucket, as it runs for ``world`` ranks with
    ``reduction="mean"``, against one ``copy_`` of the bucket timed in the same repetition
    (ratios are per repetition, then the median: slow drifts of the machine cancel).

    - ``zero``: draw the mask, multiply by ``a_j / W`` (the whole pre-allreduce work);
    - ``rescale regenerate``: also replay the other ranks' masks, count arrivals ``c_j`` and
      fold ``W / c_j`` into the same multiply (``counts_transport`` "regenerate"/"auto" on CPU);
    - ``rescale separate``: ``zero`` plus the after-allreduce multiply by ``W / c_j``.
    """
    run = timer(device)
    rows = []
    for dtype in (torch.float32, torch.float16):
        numel = 25 * 2**20 // torch.tensor([], dtype=dtype).element_size()
        bucket = torch.randn(numel, device=device).to(dtype)
        other = torch.empty_like(bucket)
        layout = PacketLayout.by_mtu(numel, mtu, bucket.element_size())
        n = layout.num_packets
        for name, spec in MODELS.items():
            models = [parse_loss_model(spec) for _ in range(world)]
            gens = [torch.Generator(device=device).manual_seed(r) for r in range(world)]

            def zero(models=models, gens=gens, layout=layout, bucket=bucket, n=n) -> None:
                lost = models[0].sample(n, gens[0])
                layout.scale_(bucket, (~lost).float().mul_(1.0 / world))

            def regenerate(models=models, gens=gens, layout=layout, bucket=bucket, n=n) -> None:
                lost = models[0].sample(n, gens[0])
                c = (~lost).to(torch.int32)
                for m, g in zip(models[1:], gens[1:], strict=True):
                    c += ~m.sample(n, g)
                c = c.float()
                factor = torch.where(c > 0, world / c.clamp_min(1.0), 0.0)
                layout.scale_(bucket, (~lost).float().mul_(factor).mul_(1.0 / world))

            def separate(models=models, gens=gens, layout=layout, bucket=bucket, n=n) -> None:
                lost = models[0].sample(n, gens[0])
                layout.scale_(bucket, (~lost).float().mul_(1.0 / world))
                c = (~lost).float() * world  # stands in for the summed counts
                layout.scale_(bucket, torch.where(c > 0, world / c.clamp_min(1.0), 0.0))

            fns = {"zero": zero, "rescale regenerate": regenerate, "rescale separate": separate}
            for fn in fns.values():
                fn()  # warm-up
            times: dict[str, list[float]] = {k: [] for k in ("copy", *fns)}
            for _ in range(reps):  # interleaved: copy, then each variant
                times["copy"] += run(lambda b=bucket, o=other: o.copy_(b), 1)
                for label, fn in fns.items():
                    times[label] += run(fn, 1)
            for label, fn in fns.items():
                ratios = [t / c for t, c in zip(times[label], times["copy"], strict=True)]
                rows.append(
                    {
                        "dtype": str(dtype).replace("torch.", ""),
                        "loss_model": name,
                        "work": label,
                        "packets": n,
                        "seconds": statistics.median(times[label]),
                        "copy_seconds": statistics.median(times["copy"]),
                        "ratio_to_copy": statistics.median(ratios),
                        "allocated_bytes": allocated_bytes(fn, device),
                    }
                )
    return rows


STEP_CONFIGS = {
    "no hook": None,
    "allreduce_hook": "builtin",
    "lossy loss 0": dict(loss_rate=0.0),
    "worker 10% zero": dict(loss_rate=0.1, drop_point="worker", fill="zero"),
    "worker 10% rescale": dict(loss_rate=0.1, drop_point="worker", fill="rescale"),  # counts: auto
    "worker 10% rescale separate": dict(loss_rate=0.1, fill="rescale", counts_transport="separate"),
    "worker 10% rescale regenerate": dict(loss_rate=0.1, fill="rescale", counts_transport="regenerate"),
    "worker 10% rescale append": dict(loss_rate=0.1, fill="rescale", counts_transport="append"),
    "post 10% shared": dict(loss_rate=0.1, drop_point="post", fill="rescale"),
    "gemodel 2% 20%": dict(loss_model="gemodel 2% 20%", drop_point="worker", fill="rescale"),
    "gemodel 2% 20% separate": dict(loss_model="gemodel 2% 20%", counts_transport="separate"),
    "fidelity on": dict(loss_rate=0.1, measure_fidelity=True),
    # encodings and protection (docs/semantics.md), all at 10% worker loss
    "hadamard 10% rescale": dict(loss_rate=0.1, fill="rescale", encoding="hadamard"),
    "hadamard 4096 10% rescale": dict(
        loss_rate=0.1, fill="rescale", encoding="hadamard", hadamard_block=4096
    ),  # the block of before 2026-12-02
    "error feedback 10%": dict(loss_rate=0.1, fill="zero", error_feedback=True),
    "fec 8 1 10%": dict(loss_rate=0.1, fill="rescale", fec=(8, 1)),
    "retransmit 1 10%": dict(loss_rate=0.1, fill="rescale", retransmit=1),
    "protect bn+bias 10%": dict(loss_rate=0.1, fill="rescale", protect=r"bn|bias|downsample\.1"),
    "wire fp16 10%": dict(loss_rate=0.1, fill="rescale", wire_dtype="fp16"),
}


class HostTime:
    """Host seconds a comm hook spends in its body and in its result callbacks, per config.

    On a CPU this is the hook's own work, most of what it adds to a step, and far less noisy
    than step time on a shared machine; on CUDA it is the time to enqueue. Callbacks are
    timed by wrapping ``lossy_hooks.core.pipeline.allreduce.join``; they finish within the step that issued
    them (DDP waits for every bucket's future), so ``current`` attributes them correctly.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current = ""
        import lossy_hooks.core.pipeline.allreduce as pipeline_module

        join = pipeline_module.join

        def timed_join(futures, on_cuda, fn, *rest):
            def timed_fn(results):
                t = time.perf_counter()
                out = fn(results)
                self.add(time.perf_counter() - t)
                return out

            return join(futures, on_cuda, timed_fn, *rest)

        pipeline_module.join = timed_join

    def add(self, seconds: float) -> None:
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + seconds

    def wrap(self, hook):
        def timed_hook(state, bucket):
            t = time.perf_counter()
            fut = hook(state, bucket)
            self.add(time.perf_counter() - t)
            return fut

        return timed_hook


def step_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torchvision
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = start_worker(rank, world, port, args.cpu)
    cuda = device.type == "cuda"
    run = timer(device)
    host = HostTime()
    results = []
    for model_name in args.models:
        for bs in args.batch_sizes:
            x = torch.randn(bs, 3, args.image_size, args.image_size, device=device)
            y = torch.randint(0, 10, (bs,), device=device)
            setups = {}
            for name, cfg in STEP_CONFIGS.items():
                if name not in args.configs and name != "allreduce_hook":
                    continue
                torch.manual_seed(0)
                m = torchvision.models.get_model(model_name, num_classes=10).to(device)
                ddp = DDP(m, device_ids=[rank] if cuda else None)
                if cfg == "builtin":
                    ddp.register_comm_hook(None, host.wrap(allreduce_hook))
                elif cfg is not None:
                    state = LossyState(**cfg)
                    state.name_parameters(m)
                    ddp.register_comm_hook(state, host.wrap(lossy_allreduce_hook))
                opt = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9)

                def step(ddp=ddp, opt=opt, x=x, y=y) -> None:
                    opt.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(ddp(x), y).backward()
                    opt.step()

                for _ in range(2):  # warm-up, including DDP's bucket rebuild
                    step()
                setups[name] = step
            host.seconds.clear()
            times: dict[str, list[float]] = {n: [] for n in setups}
            ratios: dict[str, list[float]] = {n: [] for n in setups}
            order = list(setups)
            for rep in range(args.reps):  # interleaved repetitions, a fresh order each time
                random.Random(rep).shuffle(order)  # same seed on every rank: same collectives
                this_rep = {}
                for name in order:
                    dist.barrier()
                    host.current = name
                    this_rep[name] = run(setups[name], args.steps)
                    times[name].extend(this_rep[name])
                base_rep = statistics.median(this_rep["allreduce_hook"])
                for name, ts in this_rep.items():  # paired: same repetition, minutes apart at most
                    ratios[name].append(statistics.median(ts) / base_rep)
            base = statistics.median(times["allreduce_hook"])
            for name, ts in times.items():
                med = statistics.median(ts)
                q = statistics.quantiles(ratios[name], n=4) if len(ratios[name]) > 1 else [math.nan] * 3
                results.append(
                    {
                        "model": model_name,
                        "batch_size": bs,
                        "config": name,
                        "median_seconds": med,
                        "ratio_to_allreduce_hook": med / base,
                        "paired_ratio_median": statistics.median(ratios[name]),
                        "paired_ratio_q1": q[0],
                        "paired_ratio_q3": q[2],
                        "hook_host_ms_per_step": 1e3 * host.seconds.get(name, 0.0) / len(ts),
                        "samples": len(ts),
                    }
                )
            # Memory: what a step allocates beyond allreduce_hook's step (same model and data,
            # so the difference is the hook's): bytes allocated on CPU, peak on CUDA.
            alloc = {name: allocated_bytes(step, device) for name, step in setups.items()}
            for r in results[-len(times) :]:
                r["extra_alloc_bytes_per_step"] = alloc[r["config"]] - alloc["allreduce_hook"]
            # Low-noise estimate: the builtin step plus the hook's extra host time.
            ref = next(r for r in results[-len(times) :] if r["config"] == "allreduce_hook")
            for r in results[-len(times) :]:
                extra = r["hook_host_ms_per_step"] - ref["hook_host_ms_per_step"]
                r["ratio_from_hook_time"] = 1 + extra / (1e3 * base) if r["config"] != "no hook" else math.nan
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()


def bench_step(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out).with_suffix(".step.tmp.json")
    mp.spawn(step_worker, args=(args.world_size, free_port(), args, str(out)), nprocs=args.world_size)
    rows = json.loads(out.read_text())
    out.unlink()
    return rows


def print_table(title: str, rows: list[dict], cols: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols])
    Console().print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("alone", "step", "both", "hadamard"), default="both")
    p.add_argument("--hadamard_numel", type=int, default=11_200_000, help="fp32 elements (part hadamard)")
    p.add_argument(
        "--hadamard_blocks", nargs="+", type=int, default=[4096, 2**14, 2**16, 2**18, 2**20], metavar="B"
    )
    p.add_argument("--models", nargs="+", default=["resnet18"])
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[16, 1])
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--world_size", type=int, default=2)
    p.add_argument("--reps", type=int, default=15, help="interleaved repetitions (shuffled order)")
    p.add_argument(
        "--configs", nargs="+", default=list(STEP_CONFIGS), metavar="NAME", help="step configurations to time"
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration per repetition")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--alone_reps", type=int, default=31)
    p.add_argument("--cpu", action="store_true", help="force CPU/Gloo even where CUDA exists")
    p.add_argument("--out", default="bench_results.json")
    args = p.parse_args()
    unknown = sorted(set(args.configs) - set(STEP_CONFIGS))
    if unknown:
        p.error(f"--configs: unknown {unknown}; choose from {list(STEP_CONFIGS)}")
    device = torch.device("cuda") if torch.cuda.is_available() and not args.cpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{os.cpu_count()}",
        "torch": torch.__version__,
        "args": vars(args),
    }
    if args.part in ("alone", "both"):
        result["alone"] = bench_alone(device, args.mtu, args.alone_reps)
        print_table(
            f"hook alone, 25 MiB bucket, mtu {args.mtu} ({result['device']})",
            result["alone"],
            [
                "dtype",
                "loss_model",
                "work",
                "packets",
                "seconds",
                "copy_seconds",
                "ratio_to_copy",
                "allocated_bytes",
            ],
        )
    if args.part == "hadamard":
        numel, blocks = args.hadamard_numel, args.hadamard_blocks
        result["hadamard"] = bench_hadamard(device, numel, blocks, args.alone_reps)
        print_table(
            f"Hadamard encode + decode, {args.hadamard_numel} fp32 elements ({result['device']})",
            result["hadamard"],
            ["block", "padded_elements", "encode_seconds", "decode_seconds", "copy_seconds", "ratio_to_copy"],
        )
    if args.part in ("step", "both"):
        result["step"] = bench_step(args)
        print_table(
            f"DDP step time, {args.world_size} ranks ({result['device']})",
            result["step"],
            [
                "model",
                "batch_size",
                "config",
                "median_seconds",
                "ratio_to_allreduce_hook",
                "paired_ratio_median",
                "paired_ratio_q1",
                "paired_ratio_q3",
                "hook_host_ms_per_step",
                "ratio_from_hook_time",
                "extra_alloc_bytes_per_step",
                "samples",
            ],
        )
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

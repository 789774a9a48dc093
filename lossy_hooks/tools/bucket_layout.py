"""Bucket and packet layout of a model under DDP: the bucket-size study.

    python -m lossy_hooks.tools.bucket_layout --model resnet101 --bucket_cap_mb 25 --mtu 1500 [--dtype fp16]
        [--csv layout.csv] [--json layout.json]

The buckets are read from a real DDP instance in a one-process Gloo group, after DDP's
first-iteration rebuild (a recording comm hook sees them in the second iteration), not from
a re-implementation of DDP's bucketing. For each bucket: index, first/last parameter names,
elements, bytes, packets ``ceil(N / k)`` with ``k = mtu // element_size``, and packets that
straddle a parameter boundary (hold elements of two or more parameters). From Python:
``bucket_layout(model, bucket_cap_mb=25, mtu=1500)``.

With ``--strategy fsdp --world_size W`` it shows FSDP2's units instead (what
``train_ddp.py --strategy fsdp`` shards: a GPT's blocks, else the top-level children with
parameters, then the model): per unit, its parameters, FSDP's padded elements (each
parameter's first dimension padded to a multiple of ``W``), the shard row of one rank
(padded / ``W``), its packets ``n = ceil(row / k)``, and the ``(W - 1) n`` packets a rank sends
per reduce-scatter and receives per all-gather (:func:`fsdp_layout`, computed with FSDP's own
padding rule: no process group of ``W`` ranks needed).
"""

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lossy_hooks.core.packetization import elements_per_packet
from lossy_hooks.core.process_group import single_process_group

__all__ = ["bucket_layout", "fsdp_layout", "main", "straddling_packets"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def straddling_packets(param_sizes: list[int], packet_numel: int) -> int:
    """Packets of a bucket holding elements of two or more parameters: a parameter boundary
    at offset ``b`` (not the bucket start) falls inside packet ``b // k`` unless ``b % k == 0``."""
    bounds = np.cumsum(param_sizes)[:-1]
    inside = bounds[bounds % packet_numel != 0]
    return int(np.unique(inside // packet_numel).size)


def first_bucket_cap_bytes(bucket_cap_mb: float | None) -> tuple[int, str]:
    """DDP's cap for the first rebuilt bucket, and the rule that gives it: 1 MiB
    (``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``) only when ``bucket_cap_mb`` is not
    passed (``None``: DDP's default of 25 MiB for the others); an explicit ``bucket_cap_mb``
    caps every bucket, the first included (as train_ddp.py and the sweep always pass it)."""
    if bucket_cap_mb is None:
        first = int(getattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 1024 * 1024))
        return first, f"bucket_cap_mb not passed: DDP's default first-bucket cap of {first} B"
    cap = int(bucket_cap_mb * 1024 * 1024)
    return cap, f"bucket_cap_mb={bucket_cap_mb:g} passed: the first bucket has the same cap, {cap} B"


def _bucket_row(index: int, b: dict[str, Any], mtu: int) -> dict[str, Any]:
    """One rebuilt bucket as a row: its parameters, bytes and packets at ``mtu``."""
    k = elements_per_packet(mtu, b["element_size"])
    return {
        "index": index,
        "first_param": b["names"][0],
        "last_param": b["names"][-1],
        "params": len(b["names"]),
        "elements": b["numel"],
        "bytes": b["numel"] * b["element_size"],
        "packets": -(-b["numel"] // k),
        "straddling_packets": straddling_packets(b["sizes"], k),
        "param_names": b["names"],
        "param_sizes": b["sizes"],
    }


def bucket_layout(
    model: nn.Module,
    bucket_cap_mb: float | None = 25.0,
    mtu: int = 1500,
    dtype: torch.dtype = torch.float32,
    example_input: torch.Tensor | None = None,
) -> dict[str, Any]:
    """DDP's buckets for ``model`` after the rebuild, with their packet counts.

    ``bucket_cap_mb=None`` builds DDP without the argument (its defaults: 25 MiB, and 1 MiB
    for the first rebuilt bucket); a number is passed as given. Each bucket closes after the
    parameter that reaches the cap, so a bucket can exceed it by up to one parameter.

    ``example_input`` (default: a batch of two 3x224x224 zero images) drives one
    forward/backward pass in eval mode so DDP learns the gradient-ready order; parameters are
    not changed.
    """
    model = model.to(dtype)
    names = {id(p): n for n, p in model.named_parameters()}
    if example_input is None:
        example_input = torch.zeros(2, 3, 224, 224)
    if example_input.is_floating_point():  # token ids stay integers
        example_input = example_input.to(dtype)
    seen: dict[int, dict[str, Any]] = {}
    calls = {"n": 0}

    def record(_: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if calls["n"] >= 1:  # the second iteration: rebuilt buckets
            buf = bucket.buffer()
            params = bucket.parameters()
            seen[bucket.index()] = {
                "numel": buf.numel(),
                "element_size": buf.element_size(),
                "names": [names[id(p)] for p in params],
                "sizes": [p.numel() for p in params],
            }
        if bucket.is_last():
            calls["n"] += 1
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(bucket.buffer())  # one rank: the buffer is already the sum
        return fut

    with single_process_group():
        ddp = DDP(model) if bucket_cap_mb is None else DDP(model, bucket_cap_mb=bucket_cap_mb)
        ddp.register_comm_hook(None, record)
        ddp.eval()
        for _ in range(2):
            out = ddp(example_input)
            out = out if isinstance(out, torch.Tensor) else out[0]
            out.float().sum().backward()
            model.zero_grad(set_to_none=True)
    buckets = [_bucket_row(index, seen[index], mtu) for index in sorted(seen)]
    total_packets = sum(b["packets"] for b in buckets)
    straddling = sum(b["straddling_packets"] for b in buckets)
    first_cap, rule = first_bucket_cap_bytes(bucket_cap_mb)
    return {
        "bucket_cap_mb": bucket_cap_mb,
        "first_bucket_cap_bytes": first_cap,
        "first_bucket_rule": rule,
        "mtu": mtu,
        "dtype": str(dtype).replace("torch.", ""),
        "elements_per_packet": elements_per_packet(mtu, torch.tensor([], dtype=dtype).element_size()),
        "buckets": buckets,
        "num_buckets": len(buckets),
        "packets_per_step": total_packets,
        "straddling_share": straddling / total_packets if total_packets else 0.0,
    }


def fsdp_layout(
    model: nn.Module, world_size: int, mtu: int = 1500, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """FSDP2's units for ``model`` at ``world_size`` ranks (as ``train_ddp.py --strategy fsdp``
    shards it), with their shard rows and packets (see the module docs)."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import _get_dim0_padded_size

    from lossy_hooks.study.parallel import shard_units

    names = {id(p): n for n, p in model.named_parameters()}
    module_names = {id(m): n for n, m in model.named_modules()}
    element_size = torch.tensor([], dtype=dtype).element_size()
    k = elements_per_packet(mtu, element_size)
    claimed: set[int] = set()
    units = []
    for unit in [*shard_units(model), model]:
        params = [p for p in unit.parameters() if id(p) not in claimed]
        claimed |= {id(p) for p in params}
        if not params:
            continue
        padded = sum(_get_dim0_padded_size(p.shape, world_size).numel() for p in params)
        row = padded // world_size
        n = -(-row // k)
        units.append(
            {
                "unit": module_names[id(unit)] or "(root)",
                "params": len(params),
                "first_param": names[id(params[0])],
                "elements": sum(p.numel() for p in params),
                "padded_elements": padded,
                "shard_elements": row,
                "packets_per_shard": n,
                "packets_sent_per_rank": (world_size - 1) * n,
            }
        )
    return {
        "world_size": world_size,
        "mtu": mtu,
        "dtype": str(dtype).replace("torch.", ""),
        "elements_per_packet": k,
        "units": units,
        "packets_per_reduce_scatter_round": sum(u["packets_sent_per_rank"] for u in units),
    }


FSDP_COLUMNS = [
    "unit",
    "params",
    "first_param",
    "elements",
    "padded_elements",
    "shard_elements",
    "packets_per_shard",
    "packets_sent_per_rank",
]
COLUMNS = [
    "index",
    "first_param",
    "last_param",
    "params",
    "elements",
    "bytes",
    "packets",
    "straddling_packets",
]


def main(argv: list[str] | None = None) -> int:
    from rich.table import Table

    from lossy_hooks.study.workloads.gpt import GPT_CONFIGS
    from lossy_hooks.study.workloads.models import build_model, classification_models

    p = argparse.ArgumentParser(description="DDP bucket or FSDP2 shard layout of a model, in packets")
    p.add_argument("--model", default="resnet101", help="torchvision classification model, or gpt-* or moe-*")
    p.add_argument(
        "--strategy",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="ddp: DDP's buckets; fsdp: FSDP2's units and shards at --world_size ranks",
    )
    p.add_argument("--world_size", type=int, default=2, help="fsdp: ranks sharing the model (>= 2)")
    p.add_argument("--num_classes", type=int, default=1000, help="classifier outputs (>= 1)")
    p.add_argument(
        "--bucket_cap_mb",
        type=float,
        default=25.0,
        help="DDP bucket size in MiB (> 0), passed to DDP as train_ddp.py does (every bucket, the "
        "first included, gets this cap)",
    )
    p.add_argument(
        "--ddp_default_caps",
        action="store_true",
        help="build DDP without bucket_cap_mb (its defaults: 25 MiB, first rebuilt bucket 1 MiB)",
    )
    p.add_argument("--mtu", type=int, default=1500, help="payload bytes per packet (>= element size)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="gradient dtype")
    p.add_argument("--image_size", type=int, default=224, help="example input side in pixels")
    p.add_argument("--csv", help="write the per-bucket table as CSV here")
    p.add_argument("--json", help="write the whole layout as JSON here")
    args = p.parse_args(argv)
    language_model = args.model in GPT_CONFIGS
    if not language_model and args.model not in classification_models():
        p.error(
            f"--model {args.model!r} is not a torchvision classification model or {'|'.join(GPT_CONFIGS)}"
        )
    if args.world_size < 2:
        p.error(f"--world_size must be >= 2, got {args.world_size}")
    if args.bucket_cap_mb <= 0:
        p.error(f"--bucket_cap_mb must be > 0, got {args.bucket_cap_mb}")
    if args.num_classes < 1:
        p.error(f"--num_classes must be >= 1, got {args.num_classes}")
    dtype = DTYPES[args.dtype]
    if args.mtu < torch.tensor([], dtype=dtype).element_size():
        p.error(f"--mtu must be at least one {args.dtype} element, got {args.mtu}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.manual_seed(0)
    model = build_model(args.model, args.num_classes)
    if args.strategy == "fsdp":
        return _print_fsdp(fsdp_layout(model, args.world_size, args.mtu, dtype), args)
    x = torch.zeros(2, 3, args.image_size, args.image_size)
    if language_model:
        x = torch.zeros(2, GPT_CONFIGS[args.model].block_size, dtype=torch.long)
    cap = None if args.ddp_default_caps else args.bucket_cap_mb
    layout = bucket_layout(model, cap, args.mtu, dtype, x)
    table = Table(
        title=f"{args.model}: {layout['num_buckets']} buckets of {cap or 25:g} MiB caps, "
        f"mtu {args.mtu} B = {layout['elements_per_packet']} {args.dtype} elements per packet"
    )
    left = [c for c in COLUMNS if "param" in c and c != "params"]
    console = _print_table(table, COLUMNS, left, layout["buckets"])
    console.print(
        f"packets per step: {layout['packets_per_step']}; straddling a parameter boundary: "
        f"{100 * layout['straddling_share']:.2f}%"
    )
    console.print(
        f"first bucket: {layout['first_bucket_rule']}; a bucket closes after the parameter that "
        "reaches its cap (it can exceed the cap by one parameter)"
    )
    return _write_files(layout, layout["buckets"], COLUMNS, args)


def _print_fsdp(layout: dict[str, Any], args: argparse.Namespace) -> int:
    from rich.table import Table

    table = Table(
        title=f"{args.model} under FSDP2 at {args.world_size} ranks: {len(layout['units'])} units, mtu "
        f"{args.mtu} B = {layout['elements_per_packet']} {args.dtype} elements per packet"
    )
    console = _print_table(table, FSDP_COLUMNS, ["unit", "first_param"], layout["units"])
    console.print(
        f"packets a rank sends per reduce-scatter round (one per unit): "
        f"{layout['packets_per_reduce_scatter_round']}; it receives as many per all-gather round"
    )
    return _write_files(layout, layout["units"], FSDP_COLUMNS, args)


def _print_table(table: Any, columns: Sequence[str], left: Sequence[str], rows: list[dict[str, Any]]) -> Any:
    """``rows`` as ``table``'s rows (``left`` columns left-aligned), printed; the console."""
    from rich.console import Console

    for c in columns:
        table.add_column(c, justify="left" if c in left else "right")
    for r in rows:
        table.add_row(*[str(r[c]) for c in columns])
    console = Console()
    console.print(table)
    return console


def _write_files(
    layout: dict[str, Any], rows: list[dict[str, Any]], columns: Sequence[str], args: Any
) -> int:
    """``--csv``: ``rows`` with ``columns``; ``--json``: the whole layout."""
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(layout, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

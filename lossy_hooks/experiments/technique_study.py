"""Which technique against packet loss buys the most gradient fidelity per extra byte?

    python -m lossy_hooks.experiments.technique_study --out docs/results/techniques  # ~10 min, 2 CPU ranks
    python -m lossy_hooks.experiments.technique_study --rates 0.1 --models bernoulli --rounds 1  # quick

A fixed model and fixed data per rank (the packaged digits, ``--model`` from torchvision,
untrained, seed 0): every configuration runs ``--steps`` backward passes of the same batch
through DDP with the lossy hook (``measure_fidelity=True``, worker drop, mean reduction),
``--rounds`` times with different loss seeds. Per configuration and round: the mean cosine
similarity and relative L2 error of the lossy aggregate against the lossless one, and the
bytes on the wire per step beyond the lossless ones (parity, resent packets, Hadamard
padding). Loss models: Bernoulli, and Gilbert–Elliott with mean bursts of 4 and 16 packets
(``gemodel P R 100% 0%`` with ``R = 1/burst`` and ``P = pi R / (1 - pi)`` for loss rate
``pi``). Writes ``techniques.csv`` (one row per round) and ``techniques.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from lossy_hooks.core.process_group import free_port
from lossy_hooks.core.state import LossyState
from lossy_hooks.core.statistics import mean_std
from lossy_hooks.hook import lossy_allreduce_hook
from lossy_hooks.study.workloads.data import build_datasets
from lossy_hooks.study.workloads.models import build_model, logits

__all__ = ["LOSS_MODELS", "TECHNIQUES", "loss_spec", "main"]

# technique -> LossyState settings (worker drop)
TECHNIQUES: dict[str, dict[str, Any]] = {
    "zero": dict(fill="zero"),
    "rescale": dict(fill="rescale"),
    "hadamard+rescale": dict(fill="rescale", encoding="hadamard"),
    "error feedback": dict(fill="zero", error_feedback=True),
    "fec (8,1)": dict(fill="rescale", fec=(8, 1)),
    "retransmit 1": dict(fill="rescale", retransmit=1),
    "protect norms+biases": dict(fill="rescale", protect=r"bn|bias|downsample\.1"),
}
LOSS_MODELS = {"bernoulli": 0, "GE burst 4": 4, "GE burst 16": 16}


def loss_spec(rate: float, burst: int) -> str:
    """netem text for loss ``rate``: random, or Gilbert-Elliott with mean burst ``burst``."""
    if burst == 0:
        return f"random {100 * rate:g}%"
    r = 1.0 / burst
    p = rate * r / (1.0 - rate)
    return f"gemodel {100 * p:.6g}% {100 * r:.6g}% 100% 0%"


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    data = build_datasets("digits", "", False, "320px", rank)
    idx = range(rank * args.batch_size, (rank + 1) * args.batch_size)
    x = torch.stack([data.train[i][0] for i in idx])
    y = torch.tensor([data.train[i][1] for i in idx])
    rows = []
    for label, burst in LOSS_MODELS.items():
        if label not in args.models:
            continue
        for rate in args.rates:
            for name, settings in TECHNIQUES.items():
                for k in range(args.rounds):
                    rows.append(_measure(args, x, y, data.num_classes, label, burst, rate, name, settings, k))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered[0]))
    dist.barrier()
    dist.destroy_process_group()


def _measure(args, x, y, classes, label, burst, rate, name, settings, k) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(args.model, classes)
    ddp = DDP(model, bucket_cap_mb=args.bucket_cap_mb)
    state = LossyState(
        loss_model=loss_spec(rate, burst), mtu=args.mtu, seed=k, measure_fidelity=True, **settings
    )
    state.name_parameters(model)
    ddp.register_comm_hook(state, lossy_allreduce_hook)
    for _ in range(args.steps + 1):  # the first: DDP's one-bucket iteration, not counted
        ddp.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(logits(ddp(x)), y).backward()
    records = state.fidelity()[1:]
    st = state.stats()["worker"]
    numel = sum(p.numel() for p in model.parameters())
    lossless_bytes = numel * 4 * (args.steps + 1)
    wire = st["bytes_sent"] + st.get("extra_bytes", 0)
    return {
        "loss_model": label,
        "loss_rate": rate,
        "technique": name,
        "round": k,
        "cosine": sum(r["cosine"] for r in records) / len(records),
        "rel_l2": sum(r["rel_l2"] for r in records) / len(records),
        "extra_bytes_frac": wire / lossless_bytes - 1.0,
        "packets_lost_frac": st["packets_lost"] / st["packets_sent"],
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over rounds per (loss model, rate, technique)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["loss_model"], r["loss_rate"], r["technique"]), []).append(r)
    out = []
    for (model, rate, tech), rs in groups.items():
        entry: dict[str, Any] = {"loss_model": model, "loss_rate": rate, "technique": tech, "rounds": len(rs)}
        for f in ("cosine", "rel_l2", "extra_bytes_frac", "packets_lost_frac"):
            entry[f], entry[f + "_std"] = mean_std([r[f] for r in rs])
        out.append(entry)
    return out


def _style(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, yscale="log")
    ax.grid(alpha=0.3)


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(s["loss_model"] for s in summary))
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5 * (len(models) + 1), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=False):
        for tech in TECHNIQUES:
            pts = sorted(
                (s["loss_rate"], s["rel_l2"], s["rel_l2_std"])
                for s in summary
                if (s["loss_model"], s["technique"]) == (model, tech)
            )
            if pts:
                ax.errorbar(
                    [100 * p[0] for p in pts],
                    [p[1] for p in pts],
                    [p[2] for p in pts],
                    marker="o",
                    label=tech,
                    capsize=2,
                )
        _style(ax, f"{model}: gradient error", "packet loss (%)", "relative L2 error of the aggregate")
    ax = axes[0][-1]
    top = max(s["loss_rate"] for s in summary)
    for tech in TECHNIQUES:
        pts = [s for s in summary if s["technique"] == tech and s["loss_rate"] == top]
        ax.scatter([100 * s["extra_bytes_frac"] for s in pts], [s["rel_l2"] for s in pts], label=tech)
    _style(
        ax, f"at {100 * top:g}% loss, every loss model", "extra bytes on the wire (%)", "relative L2 error"
    )
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/techniques", help="folder for techniques.csv and techniques.png")
    p.add_argument("--model", default="resnet18", help="torchvision model (untrained, fixed seed)")
    p.add_argument("--world_size", type=int, default=2, help="ranks (Gloo, CPU), >= 2")
    p.add_argument(
        "--rates", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.3], help="loss rates in (0, 1)"
    )
    p.add_argument("--models", nargs="+", default=list(LOSS_MODELS), choices=list(LOSS_MODELS))
    p.add_argument("--rounds", type=int, default=3, help="loss seeds per configuration (>= 1)")
    p.add_argument("--steps", type=int, default=4, help="measured steps per round (>= 1)")
    p.add_argument("--batch_size", type=int, default=16, help="images per rank (>= 1)")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--bucket_cap_mb", type=float, default=25.0)
    args = p.parse_args(argv)
    if args.world_size < 2:
        p.error(f"--world_size must be >= 2, got {args.world_size}")
    for name in ("rounds", "steps", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not all(0 < r < 1 for r in args.rates):
        p.error(f"--rates must be in (0, 1), got {args.rates}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw.json"
    mp.spawn(_worker, args=(args.world_size, free_port(), args, str(raw)), nprocs=args.world_size)
    rows = json.loads(raw.read_text())
    raw.unlink()
    with open(out / "techniques.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = summarize(rows)
    plot(summary, out / "techniques.png")
    for s in summary:
        print(
            f"{s['loss_model']:12s} {100 * s['loss_rate']:5.1f}% {s['technique']:22s} "
            f"rel_l2 {s['rel_l2']:.4f} ± {s['rel_l2_std']:.4f}  cos {s['cosine']:.5f}  "
            f"extra bytes {100 * s['extra_bytes_frac']:+.1f}%"
        )
    print(f"wrote {out / 'techniques.csv'} and {out / 'techniques.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

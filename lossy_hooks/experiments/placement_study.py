r"""Where a packet is lost, at cluster scale: every placement's delivered fraction of
contributions, the relative L2 error of the aggregate and the disagreement between ranks
after the broadcast phase, against the world size ``W`` (up to 1024 virtual ranks in this
process), at per-link loss rates ``p``, with the closed forms drawn beside the measured points.

The same placement code as the hook runs: :class:`~lossy_hooks.core.placement.HopLoss` draws
every link's hops from its stream and takes the survival of every ``(chunk, rank, slot)`` by
pointer doubling; there is no collective, the sums are taken here. ``ps`` (a parameter
server: one uplink and one downlink per rank) draws one mask per rank and phase.

Per configuration and trial, for a bucket of ``n`` packets, one value per rank and packet
(``g[r, j]``; a packet's elements share its fate, so more of them only reweight the norms):

* ``delivered``: ``mean_{r, j} K[r, j]``, ``K`` = contribution arrived at its chunk's root;
  closed form :meth:`Placement.expected_delivered` (ring ``(1-(1-p)^W)/(W p)``, direct
  ``1 - p (W-1)/W``, trees the mean of ``(1-p)^depth``, ps ``1 - p``);
* ``rel_l2_zero`` / ``rel_l2_rescale``: ``|A - S| / |S|`` of the root's aggregate against the
  lossless sum ``S_j = sum_r g[r, j]``, with zero fill ``A_j = sum_r K g`` and with the
  rescale ``A_j W / c_j`` (``c_j = sum_r K[r, j]``; a ps packet no copy reached counts 0);
* ``received``: ``mean_{r, j} B[r, j]``, ``B`` = result packet reached rank ``r`` (closed form
  the same function, broadcast phase);
* ``disagreement``: ``mean_r |R_r - mean_r R_r| / |mean_r R_r|`` with ``R_r = B[r] A`` the
  result rank ``r`` holds after a zero-filled broadcast (``0``: the replicas are identical).

Gradients: synthetic (``g[r, j] = mu_j + sigma e[r, j]``, ``mu, e ~ N(0, 1)``, ``sigma =
--spread``), or ``--bucket FILE`` (a tensor saved with ``torch.save``: a recorded bucket of a
real model, its first ``n`` elements as ``mu``, each rank's deviation ``sigma |mu|_rms e``).

**Time** (``--clock``): the simulated clock per hop (:mod:`lossy_hooks.core.netclock`,
:mod:`lossy_hooks.core.placement.timing`) on a network of ``--bandwidth_gbps``,
``--latency_us``, ``--jitter``, stragglers and drops, per algorithm and transport:
``reliable`` (resends what the network drops, waits for the slowest), ``fixed`` (the
deadline ``--deadline``, early close) and ``adaptive`` (``--adaptive``, after ``K``
warm-up collectives): seconds per collective (and per phase), the loss-free ``T_0``, the
share of hop transmissions cut (late or dropped) and the delivered fraction of
contributions those cuts leave (the deadline's losses through the placement's propagation).

Usage: ``python -m lossy_hooks.experiments.placement_study --out runs/placement_study`` writes
``placement_study.csv`` and ``placement_study.png`` there; with ``--clock``
``placement_time.csv`` and ``placement_time.png`` (:mod:`lossy_hooks.experiments.placement_clock`).
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path
from typing import Any

import torch

from lossy_hooks.core.placement import ALGORITHMS, HopLoss, HopPlacement, LinkRules, Placement, placement_of
from lossy_hooks.experiments.placement_clock import CPU, clock_study, network_of
from lossy_hooks.loss_models import Bernoulli
from lossy_hooks.loss_models.deadline import AdaptiveDeadline, parse_deadline

__all__ = ["FIELDS", "main", "measure", "plot"]

FIELDS = [
    "algorithm",
    "world",
    "loss_rate",
    "trials",
    "delivered",
    "delivered_closed_form",
    "received",
    "received_closed_form",
    "rel_l2_zero",
    "rel_l2_rescale",
    "disagreement",
    "seconds_per_collective",
]


class _Collectives:
    """Successive collectives of one placement at ``W`` virtual ranks: ``next()`` gives
    ``(K, B)``, ``(W, n)`` bool, contribution reached its root / result reached the rank
    (built once: the schedule and every link's model)."""

    def __init__(self, placement: Placement, world: int, p: float, packets: int, seed: int) -> None:
        self.world, self.p, self.packets = world, p, packets
        self.generator = torch.Generator().manual_seed(seed)
        self.hops = None
        if isinstance(placement, HopPlacement):
            self.hops = HopLoss(placement, Bernoulli(p), LinkRules(), ("reduce", "broadcast"))
            self.hops.prepare(CPU, seed, 0, world)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.world, self.packets)
        if self.hops is None:  # ps: one uplink and one downlink per rank
            gen = self.generator
            return torch.rand(shape, generator=gen) >= self.p, torch.rand(shape, generator=gen) >= self.p
        out = []
        for phase in ("reduce", "broadcast"):
            alive, _ = self.hops.survival(phase, self.hops.draw(phase, self.packets, CPU), self.packets, CPU)
            out.append(self.hops.per_rank(alive, self.packets, CPU))
        return out[0], out[1]


def measure(
    algorithm: str,
    world: int,
    p: float,
    packets: int,
    trials: int,
    mu: torch.Tensor,
    spread: float,
    seed: int,
) -> dict[str, Any]:
    """One row of :data:`FIELDS`: the means over ``trials`` independent collectives."""
    placement = placement_of(algorithm)
    sums = dict.fromkeys(("delivered", "received", "rel_l2_zero", "rel_l2_rescale", "disagreement"), 0.0)
    seconds = 0.0
    collectives = _Collectives(placement, world, p, packets, seed)
    for t in range(trials):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + t)
        g = mu[None, :packets] + spread * mu.square().mean().sqrt() * torch.randn(
            (world, packets), generator=gen
        )
        start = time.perf_counter()
        keep, got = collectives.next()
        seconds += time.perf_counter() - start
        exact = g.sum(0)
        zero = (g * keep).sum(0)
        counts = keep.sum(0)
        rescaled = torch.where(counts > 0, zero * world / counts.clamp_min(1), 0.0)
        held = got * zero[None, :]
        mean_held = held.mean(0)
        norm = exact.norm().clamp_min(1e-30)
        sums["delivered"] += float(keep.double().mean())
        sums["received"] += float(got.double().mean())
        sums["rel_l2_zero"] += float((zero - exact).norm() / norm)
        sums["rel_l2_rescale"] += float((rescaled - exact).norm() / norm)
        spread_r = (held - mean_held).norm(dim=1) / mean_held.norm().clamp_min(1e-30)
        sums["disagreement"] += float(spread_r.mean())
    row: dict[str, Any] = {"algorithm": algorithm, "world": world, "loss_rate": p, "trials": trials}
    row |= {k: v / trials for k, v in sums.items()}
    row["delivered_closed_form"] = placement.expected_delivered(world, p, "reduce")
    row["received_closed_form"] = placement.expected_delivered(world, p, "broadcast")
    row["seconds_per_collective"] = seconds / trials
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Delivered fraction (closed forms as lines) and the zero-fill error against ``W``, one
    line per algorithm, one column per loss rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r["loss_rate"] for r in rows})
    fig, axes = plt.subplots(2, len(rates), figsize=(4.2 * len(rates), 7), squeeze=False)
    for col, p in enumerate(rates):
        for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
            sel = sorted(
                (r for r in rows if r["algorithm"] == algorithm and r["loss_rate"] == p),
                key=lambda r: r["world"],
            )
            w = [r["world"] for r in sel]
            (line,) = axes[0][col].plot(w, [r["delivered_closed_form"] for r in sel], "-", label=algorithm)
            axes[0][col].plot(w, [r["delivered"] for r in sel], "o", color=line.get_color(), ms=4)
            axes[1][col].plot(w, [r["rel_l2_zero"] for r in sel], "o-", color=line.get_color(), ms=4)
        axes[0][col].set_title(f"per-link loss {p * 100:g}%")
        for row, label in ((0, "delivered fraction of contributions"), (1, "relative L2 error (zero fill)")):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xlabel("world size W")
            axes[row][col].set_ylabel(label)
            axes[row][col].grid(alpha=0.3)
        axes[1][col].set_yscale("log")
    axes[0][0].legend(title="lines: closed form; dots: measured", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    """The study's flags: the grid, the gradients, and the clock's network (``--clock``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/placement_study"))
    p.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    p.add_argument("--worlds", type=int, nargs="+", default=[2**k for k in range(1, 11)])
    p.add_argument("--loss_rates", type=float, nargs="+", default=[0.0001, 0.001, 0.01])
    p.add_argument("--packets", type=int, default=4096, help="packets per bucket (>= 1)")
    p.add_argument("--trials", type=int, default=4, help="collectives per point (>= 1)")
    p.add_argument("--spread", type=float, default=1.0, help="ranks' gradient spread around the mean (>= 0)")
    p.add_argument(
        "--bucket", type=Path, default=None, help="a recorded bucket (torch.save'd tensor) as the mean"
    )
    p.add_argument("--seed", type=int, default=0)
    t = p.add_argument_group("time (--clock): the simulated clock per hop")
    t.add_argument("--clock", action="store_true", help="price the placements on the clock instead")
    t.add_argument("--mtu", type=int, default=1500, help="bytes per packet (>= 1)")
    t.add_argument("--bandwidth_gbps", type=float, default=100.0)
    t.add_argument("--latency_us", type=float, default=5.0)
    t.add_argument(
        "--jitter", default="lognormal 1 1", help="'none', 'lognormal MU SIGMA', 'pareto XM A' (us)"
    )
    t.add_argument("--straggler_prob", type=float, default=0.0)
    t.add_argument("--straggler_factor", type=float, default=1.0)
    t.add_argument("--drop_rate", type=float, default=0.0)
    t.add_argument("--rto_us", type=float, default=1000.0)
    t.add_argument("--deadline", default="1.5x", help="the fixed transport's deadline ('1.5x', '800us')")
    t.add_argument(
        "--adaptive", default="adaptive", help="the adaptive transport ('adaptive p99 last=8 cap=3x')"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """The flags checked and the mean gradient made or read; then the time study
    (``--clock``) or the loss study."""
    p = _parser()
    args = p.parse_args(argv)
    for name, low in (("packets", 1), ("trials", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if any(w < 1 or w > 4096 for w in args.worlds):
        p.error(f"--worlds must be in [1, 4096], got {args.worlds}")
    if any(not 0.0 <= r < 1.0 for r in args.loss_rates):
        p.error(f"--loss_rates must be in [0, 1), got {args.loss_rates}")
    if not (args.spread >= 0 and math.isfinite(args.spread)):
        p.error(f"--spread must be >= 0, got {args.spread}")
    if args.bucket is not None:
        if not args.bucket.is_file():
            p.error(f"--bucket {args.bucket}: no such file")
        mu = torch.load(args.bucket, weights_only=True).detach().flatten().double()
        if mu.numel() < args.packets:
            p.error(f"--bucket holds {mu.numel()} elements, fewer than --packets {args.packets}")
    else:
        mu = torch.randn(
            args.packets, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64
        )
    args.out.mkdir(parents=True, exist_ok=True)
    if args.clock:
        if args.mtu < 1:
            p.error(f"--mtu must be >= 1, got {args.mtu}")
        try:
            network_of(args)
            parse_deadline(args.deadline)
            if not isinstance(parse_deadline(args.adaptive), AdaptiveDeadline):
                p.error(f"--adaptive must read 'adaptive ...', got {args.adaptive!r}")
        except ValueError as e:
            p.error(str(e))
        return clock_study(args)
    return _loss_study(args, mu)


def _loss_study(args: argparse.Namespace, mu: torch.Tensor) -> int:
    """Every algorithm, world size and loss rate: :func:`measure` (one CSV row each, written
    as it comes) and the figure."""
    path = args.out / "placement_study.csv"
    rows = []
    with open(path, "w", newline="", encoding="utf-8") as fh:  # one row at a time: a kill keeps them
        writer = csv.DictWriter(fh, FIELDS)
        writer.writeheader()
        for rate in args.loss_rates:
            for algorithm in args.algorithms:
                for world in args.worlds:
                    row = measure(
                        algorithm, world, rate, args.packets, args.trials, mu.float(), args.spread, args.seed
                    )
                    rows.append(row)
                    writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
                    fh.flush()
                    print(
                        f"{algorithm:>6} W={world:<5} p={rate:<7g} delivered {row['delivered']:.4f} "
                        f"(closed {row['delivered_closed_form']:.4f}) rel_l2 {row['rel_l2_zero']:.4g}",
                        flush=True,
                    )
    plot(rows, args.out / "placement_study.png")
    print(f"wrote {path} and {args.out / 'placement_study.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

r"""What one lost pipeline packet does to the gradients (issue 43's pp finding), in one process:

    python -m lossy_hooks.experiments.stage_probe                          # a fresh gpt-tiny
    python -m lossy_hooks.experiments.stage_probe --checkpoint RUN/round0/final.pt   # a --pp 2 run's model
    python -m lossy_hooks.experiments.stage_probe --out docs/results/traffic/stage_probe.csv

A GPT cut into two stages (``GPTStage``); stage 0 computes the hidden states
:math:`h \in \mathbb{R}^{B \times T \times C}` of a batch of the standard library's bytes
(validation windows of the study's corpus); one packet of ``--mtu`` bytes of :math:`h` (fp32:
``mtu/4`` consecutive elements of the flattened tensor, at a random packet boundary, as
``--traffic_loss pp=...`` draws them) is lost on its way to stage 1 and filled:

- ``intact``: nothing lost (the reference);
- ``zero``: the packet's elements are 0 (``--traffic_fill zero``): a token whose whole
  vector lies in the packet enters stage 1 as :math:`h_t = 0`;
- ``stale``: the elements of the same place in the previous batch's message
  (``--traffic_fill stale``).

Stage 1 computes the mean cross-entropy and its backward; the gradient
:math:`g = \partial \ell / \partial h` travels back to stage 0, whose parameters' gradient
follows. A pre-norm block's first operation on :math:`h_t` is LayerNorm,
:math:`\mathrm{LN}(x) = \gamma \odot (x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta`, whose
Jacobian at :math:`x = 0` (:math:`\sigma = 0`) is :math:`\mathrm{diag}(\gamma) (I -
\mathbf{1}\mathbf{1}^\top / C) / \sqrt{\epsilon}` (:math:`1/\sqrt{10^{-5}} \approx 316`):
the gradient sent back for a zeroed token is multiplied by that, where a real token's is
divided by its own :math:`\sigma`. Per fill over ``--trials`` batches: the loss, the norm of
stage 1's and of stage 0's parameter gradients, and the largest and the median per-token
norm of :math:`g` (medians over trials; ``max_*`` the largest trial). Writes one CSV row per
fill (``--out``, 6 significant digits) and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from lossy_hooks.experiments.time_runs import write_table
from lossy_hooks.study.workloads.gpt import GPT_CONFIGS, GPTStage, build_gpt
from lossy_hooks.study.workloads.text_data import load_corpus

__all__ = ["FIELDS", "FILLS", "main", "probe"]

FILLS = ("intact", "zero", "stale")
FIELDS = (
    "fill",
    "loss",
    "stage1_grad_norm",
    "stage0_grad_norm",
    "max_stage0_grad_norm",
    "returned_grad_max_token",
    "returned_grad_median_token",
)


def _load_stages(stages: tuple[GPTStage, GPTStage], checkpoint: Path) -> None:
    """The parameters of a ``--pp 2`` run's checkpoint: ranks 0 and 1 hold stages 0 and 1 of
    replica 0 (each rank saves its own parameters under their stage's names; whole ones
    under DDP without ``--tp``)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["ranks"]
    with torch.no_grad():
        for rank, stage in enumerate(stages):
            own = saved[rank]["model"]
            for name, p in stage.named_parameters():
                if name not in own:
                    raise ValueError(
                        f"--checkpoint {checkpoint}: rank {rank} has no {name} (not a --pp 2 run?)"
                    )
                shape = tuple(own[name].shape)
                if shape != p.shape:  # a --tp or FSDP2 run saves its ranks' shards
                    raise ValueError(
                        f"--checkpoint {checkpoint}: rank {rank}'s {name} is a shard {shape} of "
                        f"{tuple(p.shape)} (a --pp 2 run without --tp, under DDP?)"
                    )
                p.copy_(own[name])


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    return torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None])
    )


def probe(
    model: str = "gpt-tiny",
    checkpoint: Path | None = None,
    trials: int = 20,
    batch_size: int = 4,
    mtu: int = 1500,
    seed: int = 0,
) -> list[dict[str, float | str]]:
    """One row per fill of :data:`FILLS` (see the module): medians over ``trials`` batches."""
    if mtu % 4 or mtu < 4:
        raise ValueError(f"--mtu must be a positive multiple of 4 bytes (fp32 elements), got {mtu}")
    if trials < 2:
        raise ValueError(f"--trials must be >= 2 (stale needs a previous batch), got {trials}")
    torch.manual_seed(seed)
    gpt = build_gpt(model)
    stages = (GPTStage(gpt, 0, 2), GPTStage(gpt, 1, 2))
    if checkpoint is not None:
        _load_stages(stages, checkpoint)
    block = GPT_CONFIGS[model].block_size
    _, val, _ = load_corpus(None, 1 << 20)
    gen = torch.Generator().manual_seed(seed + 1)
    per_packet = mtu // 4
    rows: dict[str, list[torch.Tensor]] = {fill: [] for fill in FILLS}
    previous = None
    for _ in range(trials):
        starts = torch.randint(0, len(val) - block - 1, (batch_size,), generator=gen)
        windows = torch.stack([val[s : s + block + 1] for s in starts.tolist()]).long()
        x, y = windows[:, :-1], windows[:, 1:]
        with torch.no_grad():
            h = stages[0](x)
        start = int(torch.randint(0, h.numel() // per_packet, (1,), generator=gen)) * per_packet
        for fill in FILLS:
            received = h.clone().reshape(-1)
            if fill == "zero":
                received[start : start + per_packet] = 0
            elif fill == "stale" and previous is not None:
                received[start : start + per_packet] = previous.reshape(-1)[start : start + per_packet]
            received = received.view_as(h).requires_grad_(True)
            for stage in stages:
                stage.zero_grad(set_to_none=True)
            loss = F.cross_entropy(stages[1](received).flatten(0, 1), y.flatten())
            loss.backward()
            returned = received.grad
            stages[0](x).backward(returned)
            per_token = returned.norm(dim=-1)
            rows[fill].append(
                torch.stack(
                    [
                        loss.detach(),
                        _grad_norm(stages[1]),
                        _grad_norm(stages[0]),
                        per_token.max(),
                        per_token.median(),
                    ]
                )
            )
        previous = h
    out = []
    for fill, values in rows.items():
        t = torch.stack(values).double()
        med = t.median(dim=0).values
        out.append(
            {
                "fill": fill,
                "loss": float(t[:, 0].mean()),
                "stage1_grad_norm": float(med[1]),
                "stage0_grad_norm": float(med[2]),
                "max_stage0_grad_norm": float(t[:, 2].max()),
                "returned_grad_max_token": float(med[3]),
                "returned_grad_median_token": float(med[4]),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lossy_hooks.experiments.stage_probe", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--model", default="gpt-tiny", choices=[n for n, c in GPT_CONFIGS.items() if c.moe is None]
    )
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="a --pp 2 run's round*/final.pt or checkpoint.pt"
    )
    p.add_argument("--trials", type=int, default=20, help="batches (>= 2)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--mtu", type=int, default=1500, help="bytes per packet (a multiple of 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="CSV of the table")
    args = p.parse_args(argv)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        p.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {args.batch_size}")
    try:
        rows = probe(args.model, args.checkpoint, args.trials, args.batch_size, args.mtu, args.seed)
    except ValueError as e:
        p.error(str(e))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_table(args.out, rows, list(FIELDS))
    for row in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What one epoch of training adds up on a rank (:class:`EpochTally`), and its metrics.csv
training columns summed over the ranks."""

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lossy_hooks import LossyState

__all__ = ["EpochTally"]


@dataclass
class EpochTally:
    """What one epoch of training adds up on this rank, on the device (no host sync per
    step): the micro-batches of the open accumulation group, and the groups whose step the
    GradScaler did not skip."""

    device: torch.device
    loss_sum: torch.Tensor = field(init=False)
    correct: torch.Tensor = field(init=False)
    group_loss: torch.Tensor = field(init=False)
    group_correct: torch.Tensor = field(init=False)
    seen: int = 0
    group_seen: int = 0
    skipped: int = 0
    processed: int = 0
    drift: list[tuple[float, float]] = field(default_factory=list)
    skipped_hook_steps: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.group_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.group_correct = torch.zeros((), dtype=torch.long, device=self.device)

    def add_micro_batch(self, loss: torch.Tensor, hits: torch.Tensor, count: int, batch: int) -> None:
        self.group_loss += loss.detach().double() * count
        self.group_correct += hits
        self.group_seen += count
        self.processed += batch

    def close_group(self, skipped_hook_step: int | None) -> None:
        """The group's optimizer step ran (``None``) or was skipped at hook step ``skipped_hook_step``."""
        if skipped_hook_step is not None:
            self.skipped += 1
            self.skipped_hook_steps.add(skipped_hook_step)
        else:
            self.loss_sum += self.group_loss
            self.correct += self.group_correct
            self.seen += self.group_seen
        self.group_loss.zero_()
        self.group_correct.zero_()
        self.group_seen = 0

    def row(
        self, cfg: dict[str, Any], state: LossyState, world: int, t0: float, tp: int = 1
    ) -> dict[str, Any]:
        """The epoch's metrics.csv training columns, summed over the ranks (collectives). With
        ``--tp`` the ``tp`` ranks of a replica see the same batches and compute the same loss:
        loss and accuracy are ratios of sums in which every replica weighs ``tp`` times (the
        ratio of the replicas' own sums), and the examples processed are divided by ``tp``."""
        dev, drift, skipped_hook_steps = self.device, self.drift, self.skipped_hook_steps
        counts = torch.tensor([self.seen, self.skipped, self.processed], dtype=torch.float64, device=dev)
        totals = torch.cat([torch.stack([self.loss_sum, self.correct.double()]), counts])
        dist.all_reduce(totals)
        seconds = time.perf_counter() - t0
        row = {
            # None (an empty cell) when the scaler skipped every step of the epoch
            "train_loss": float(totals[0] / totals[2]) if totals[2] > 0 else None,
            "train_acc": float(totals[1] / totals[2]) if totals[2] > 0 else None,
            "epoch_seconds": seconds,
            "images_per_s": float(totals[4]) / tp / seconds,
        }
        if cfg["amp"]:
            row["skipped_steps"] = round(float(totals[3]) / world)  # the same on every rank
        if drift:
            row["drift_max"] = max(d[0] for d in drift)
            row["drift_mean"] = sum(d[1] for d in drift) / len(drift)
        if cfg["measure_fidelity"]:
            # FSDP: each rank reduces one shard; the whole gradient is every rank's shard
            shards = cfg.get("strategy", "ddp") == "fsdp"
            fid = [f for f in state.fidelity(all_ranks=shards) if f["step"] not in skipped_hook_steps]
            sums = [sum(f["cosine"] for f in fid), sum(f["rel_l2"] for f in fid), len(fid)]
            vals = torch.tensor(sums, dtype=torch.float64, device=dev)
            dist.all_reduce(vals)
            if vals[2] > 0:
                row["fidelity_cosine"] = float(vals[0] / vals[2])
                row["fidelity_rel_l2"] = float(vals[1] / vals[2])
        return row

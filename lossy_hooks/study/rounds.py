"""One round of the study: a fresh model, its parallel wrapper and LossyState, then epochs of
training and evaluation, each epoch's metrics, bucket and layer rows appended and fsynced,
checkpoints at the end of each epoch (a resumed round continues from the last one), the
round's status.json and figures."""

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from lossy_hooks import LossyState
from lossy_hooks.core.streams import Stream, derive_seed
from lossy_hooks.study.checkpoints import load_checkpoint, save_checkpoint
from lossy_hooks.study.cli import gather_kwargs, hook_kwargs
from lossy_hooks.study.parallel import fsdp_api, no_grad_sync, parallelize, tp_layout
from lossy_hooks.study.plotting import plot_round
from lossy_hooks.study.progress import Reporter
from lossy_hooks.study.replicas import replica_drift, resync_replicas
from lossy_hooks.study.run_control import (
    fault_point,
)
from lossy_hooks.study.run_io import (
    BUCKET_FIELDS,
    LAYER_FIELDS,
    MetricsLog,
    packet_rows,
    write_json,
)
from lossy_hooks.study.tensorboard_log import TensorBoardLog, round_log_dir
from lossy_hooks.study.traffic import TRAFFIC_KINDS, traffic_columns, traffic_states
from lossy_hooks.study.workloads.gpt import auxiliary_loss
from lossy_hooks.study.workloads.models import build_model, build_optimizer, logits

METRICS, BUCKETS, LAYERS = "metrics.csv", "buckets.csv", "layers.csv"


@dataclass
class _EpochTally:
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


class RoundRunner:
    """One round (repetition) of the experiment: model, DDP or FSDP, the lossy states, epochs."""

    def __init__(
        self,
        cfg: dict[str, Any],
        run_dir: Path,
        k: int,
        data,
        rank: int,
        world: int,
        device: torch.device,
        report: Reporter,
    ) -> None:
        self.cfg, self.k, self.data, self.rank, self.world, self.device = cfg, k, data, rank, world, device
        self.report = report
        self.dir = run_dir / f"round{k}"
        self.seed = cfg["seed"] + k
        torch.manual_seed(self.seed)  # same initial model on every rank
        model = build_model(cfg["model"], data.num_classes).to(device)
        self.module = model
        self.fsdp = cfg.get("strategy", "ddp") == "fsdp"
        self.tp = int(cfg.get("tp") or 1)
        self.dp, self.dp_rank = world // self.tp, rank // self.tp  # data-parallel replicas, this one
        # traffic beyond data parallelism: one state per type (loss 0 where it does not lose)
        self.traffic = traffic_states(cfg, self.seed, self.dp_rank)
        layout = None
        if self.tp > 1:
            layout = tp_layout(self.tp, self.traffic["tp"], TRAFFIC_KINDS["tp"], device.type)
        dp_group = layout.dp_group if layout is not None else None
        self.state = LossyState(**hook_kwargs(cfg, self.seed), process_group=dp_group)
        self.state.name_parameters(model)  # for --protect
        gathering = self.fsdp and cfg.get("all_gather_loss_rate", 0.0) > 0
        self.gather = fsdp_api().gather_state(**gather_kwargs(cfg, self.seed)) if gathering else None
        # DDP wraps the model; fully_shard turns it into its own FSDP module (self.ddp is self.module)
        self.ddp = parallelize(
            model, cfg["strategy"], self.state, self.gather, device, cfg["bucket_cap_mb"], layout
        )
        # a tensor-parallel model under DDP: its parameters (this rank's shards) as made here;
        # after a forward its DTensor ones are module attributes, out of named_parameters()
        self.local_params = list(model.named_parameters()) if layout is not None and not self.fsdp else []
        if layout is not None:
            self.state.name_parameters(model)
        self.opt = build_optimizer(cfg["optimizer"], self.ddp, cfg["learning_rate"])
        self.scaler = torch.amp.GradScaler(device.type, init_scale=cfg["amp_init_scale"], enabled=cfg["amp"])
        # per-replica data randomness: the tp ranks of a replica draw the same
        torch.manual_seed(derive_seed(self.seed, Stream.DATA, self.dp_rank))
        if not self.fsdp:  # FSDP does not rebuild buckets
            self.warm_up()
        workers = 0 if isinstance(data.train, torch.utils.data.TensorDataset) else cfg["workers"]
        self.sampler = DistributedSampler(data.train, self.dp, self.dp_rank, shuffle=True, seed=self.seed)
        self.loader = DataLoader(
            data.train,
            batch_size=cfg["batch_size"],
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )
        # every sample exactly once per replica (its tp ranks run the same forward); under FSDP
        # every rank must run as many forward passes (they all-gather), so the set is cut to a
        # multiple of the dp size (< dp samples)
        val_end = len(data.val) // self.dp * self.dp if self.fsdp else len(data.val)
        val_shard = Subset(data.val, range(self.dp_rank, val_end, self.dp))
        self.val_loader = DataLoader(val_shard, batch_size=cfg["batch_size"], num_workers=workers)
        self.start_epoch, self.steps = 0, 0

    def warm_up(self) -> None:
        """One lossless, uncounted iteration so DDP rebuilds its buckets before the first
        real step: fresh and resumed runs then draw identical loss sequences."""
        with self.state.passthrough(), self.traffic_passthrough():
            self.ddp.eval()
            logits(self.ddp(self.data.example_batch(2, self.device))).float().sum().backward()
            self.ddp.train()
        self.opt.zero_grad(set_to_none=True)

    def traffic_passthrough(self) -> contextlib.ExitStack:
        """Every traffic state lossless and uncounted (the warm-up, validation)."""
        stack = contextlib.ExitStack()
        for state in self.traffic.values():
            stack.enter_context(state.passthrough())
        return stack

    def resume(self) -> None:
        ckpt_path = self.dir / "checkpoint.pt"
        if not ckpt_path.exists():
            # killed before the first checkpoint: the round starts over, so rows it wrote
            # (an epoch finished, then the kill before its checkpoint) must go
            if self.rank == 0:
                for log in (METRICS, BUCKETS, LAYERS):
                    (self.dir / log).unlink(missing_ok=True)
            dist.barrier()
            return
        self.start_epoch, self.steps = load_checkpoint(self, ckpt_path)
        if self.rank == 0:
            for log in self.logs().values():
                log.truncate_after(self.start_epoch)
        self.report.print(f"round {self.k}: resumed after epoch {self.start_epoch} ({self.steps} steps)")

    def logs(self) -> dict[str, MetricsLog]:
        return {
            "metrics": MetricsLog(self.dir / METRICS),
            "buckets": MetricsLog(self.dir / BUCKETS, BUCKET_FIELDS),
            "layers": MetricsLog(self.dir / LAYERS, LAYER_FIELDS),
        }

    def epoch_counts(self, epoch: int) -> tuple[dict[str, Any], list[dict], list[dict]]:
        """Packets since the previous call (the ledger's mark, kept in the hook's checkpoint)
        as metrics.csv columns and buckets.csv / layers.csv rows (a collective)."""
        names = {id(p): n for n, p in [*self.local_params, *self.module.named_parameters()]}
        columns, buckets, layers = packet_rows(self.state.ledger.since_mark(names, all_ranks=True), epoch)
        columns |= traffic_columns(self.traffic)  # tp_packets_sent, ...: every rank
        if self.gather is not None:  # the all-gather's receivers: columns gather_*, rows "gather"
            counts = self.gather.ledger.since_mark({}, all_ranks=True)
            post = counts["points"]["post"]
            columns |= {
                "gather_packets_sent": post["packets_sent"],
                "gather_packets_lost": post["packets_lost"],
            }
            for b in counts["buckets"]:
                b["drop_point"] = "gather"
            buckets += packet_rows({"points": {}, "buckets": counts["buckets"], "parameters": []}, epoch)[1]
        if self.state.clock is not None:  # the same on every rank (one shared random stream)
            columns |= self.state.clock.since_mark()
        return columns, buckets, layers

    def checkpoint(self, epoch: int, final: bool = False) -> None:
        save_checkpoint(self, self.dir / ("final.pt" if final else "checkpoint.pt"), epoch)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over this rank's shard. Micro-batches are grouped ``--accumulation_steps``
        at a time into one optimizer step (the hook fires once per step); each micro-batch's
        loss is divided by the size of *its* group, so a short last group (end of the epoch)
        still steps with the mean of its micro-batches' gradients. With ``--amp`` a step the
        GradScaler skips (an overflow) is counted in ``skipped_steps`` and its micro-batches
        and fidelity are kept out of the epoch's averages."""
        cfg, dev = self.cfg, self.device
        self.ddp.train()
        self.sampler.set_epoch(epoch)
        acc_steps = cfg["accumulation_steps"]
        tally = _EpochTally(dev)
        n_batches = len(self.loader)
        self.report.start_epoch(f"round {self.k} epoch {epoch + 1}/{cfg['num_epochs']}", n_batches)
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(self.loader):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            group_start = i // acc_steps * acc_steps
            group_size = min(acc_steps, n_batches - group_start)
            sync = i == group_start + group_size - 1
            with no_grad_sync(self.ddp, not sync):
                with torch.autocast(dev.type, dtype=torch.float16, enabled=cfg["amp"]):
                    loss, hits, count = _task_loss(logits(self.ddp(x)), y)
                    aux = auxiliary_loss(self.module)  # an MoE GPT's load balancing, else None
                objective = loss if aux is None else loss + aux
                self.scaler.scale(objective / group_size).backward()
            tally.add_micro_batch(loss, hits, count, len(y))
            if sync:
                scale_before = self.scaler.get_scale() if cfg["amp"] else 0.0
                self.scaler.step(self.opt)
                self.scaler.update()
                self.opt.zero_grad(set_to_none=True)
                self.steps += 1
                overflow = cfg["amp"] and self.scaler.get_scale() < scale_before  # inf/nan: skipped
                tally.close_group(self.state.steps - 1 if overflow else None)
                if cfg["resync"] and self.steps % cfg["resync"] == 0:
                    resync_replicas(self.module, self.opt)
                if cfg["measure_drift"] and self.steps % cfg["measure_drift"] == 0:
                    tally.drift.append(replica_drift(self.module))
                if self.report.enabled and (i % 10 == 0 or i == n_batches - 1):
                    st = self.state.stats()
                    self.report.update(i + 1, tally.processed * self.dp, float(loss.detach()), _rate(st))
                if cfg["max_steps"] and self.steps >= cfg["max_steps"]:
                    break
        return tally.row(cfg, self.state, self.world, t0, self.tp)

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """Validation loss and accuracy (per token for a language model). Under FSDP the
        parameters are gathered without loss here, and tensor-parallel traffic is lossless:
        it measures the model training made. With ``--tp`` each replica's sums count ``tp``
        times in numerator and denominator alike (its tp ranks compute the same)."""
        self.module.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        lossless = self.gather.passthrough() if self.gather is not None else contextlib.nullcontext()
        with lossless, self.traffic_passthrough():
            for x, y in self.val_loader:
                x, y = x.to(self.device), y.to(self.device)
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.cfg["amp"]):
                    out = logits(self.module(x))
                loss, hits, count = _task_loss(out.float(), y)
                totals += torch.stack([loss.double() * count, hits.double(), torch.tensor(float(count))])
        dist.all_reduce(totals)
        return float(totals[0] / totals[2]), float(totals[1] / totals[2])

    def run(self) -> str:
        cfg = self.cfg
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if cfg["resume"]:
            self.resume()
        logs = self.logs() if self.rank == 0 else None
        board = None
        if self.rank == 0 and cfg.get("tensorboard") is not None:  # one TensorBoard run per round
            log_dir = round_log_dir(cfg["tensorboard"], self.dir.parent, self.k)
            board = TensorBoardLog(log_dir, self.start_epoch + 1, cfg)
        status = "finished"
        epochs_done = self.start_epoch
        for epoch in range(self.start_epoch, cfg["num_epochs"]):
            if cfg["max_steps"] and self.steps >= cfg["max_steps"]:
                break  # a resumed round that had already reached --max_steps
            steps_before = self.steps
            row = self.train_epoch(epoch)
            last = epoch == cfg["num_epochs"] - 1 or bool(cfg["max_steps"] and self.steps >= cfg["max_steps"])
            diverged = row["train_loss"] is not None and not math.isfinite(row["train_loss"])
            if (epoch + 1) % cfg["eval_every"] == 0 or last or diverged:
                row["val_loss"], row["val_acc"] = self.validate()
                diverged = diverged or not math.isfinite(row["val_loss"])
                if self.data.task == "lm" and not diverged:
                    row["val_perplexity"] = math.exp(row["val_loss"])
            packet_columns, bucket_rows, layer_rows = self.epoch_counts(epoch + 1)
            row.update(
                epoch=epoch + 1, steps=self.steps, status="diverged" if diverged else "ok", **packet_columns
            )
            if "sim_comm_s" in row:
                row["sim_comm_per_step_s"] = row["sim_comm_s"] / max(self.steps - steps_before, 1)
            if logs is not None:
                logs["buckets"].append(*bucket_rows)
                logs["layers"].append(*layer_rows)
                logs["metrics"].append(row)
                if board is not None:
                    board.write_epoch(row, bucket_rows)
                fault_point("after_metrics", epoch + 1)
            self.report.end_epoch(row)
            epochs_done = epoch + 1
            if diverged:
                status = "diverged"
                self.report.print(f"round {self.k}: loss became {row['train_loss']}: diverged, round ends")
                break
            self.checkpoint(epoch + 1)
            if last:
                break
        self.checkpoint(epochs_done, final=True)
        if board is not None:
            board.close()
        if self.rank == 0:
            write_json(
                self.dir / "status.json", {"status": status, "epochs": epochs_done, "steps": self.steps}
            )
            plot_round(
                self.dir / "metrics.csv", self.dir / "metrics.png", f"{self.dir.parent.name} round {self.k}"
            )
        return status


def _task_loss(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean cross-entropy, correct predictions and their number: per image, or per token of
    a language model (``out`` ``(B, T, V)``, ``y`` ``(B, T)``)."""
    if out.dim() == 3:
        out, y = out.flatten(0, 1), y.flatten()
    return nn.functional.cross_entropy(out, y), (out.argmax(1) == y).sum(), y.numel()


def _rate(stats: dict[str, Any]) -> float:
    sent = sum(stats[p]["packets_sent"] for p in ("worker", "post") if p in stats)
    lost = sum(stats[p]["packets_lost"] for p in ("worker", "post") if p in stats)
    return lost / sent if sent else 0.0

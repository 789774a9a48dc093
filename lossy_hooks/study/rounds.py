"""One round of the study: a fresh model, its parallel wrapper and LossyState, then epochs of
training and evaluation, each epoch's metrics, bucket and layer rows appended and fsynced,
checkpoints at the end of each epoch (a resumed round continues from the last one), the
round's status.json and figures."""

import contextlib
import math
import time
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
from lossy_hooks.study.epoch_tally import EpochTally
from lossy_hooks.study.mesh import MeshShape
from lossy_hooks.study.parallel import (
    expert_parameters,
    fsdp_api,
    model_parallel_layout,
    no_grad_sync,
    parallelize,
    reduce_expert_gradients,
)
from lossy_hooks.study.pipelining import StagePipeline
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
from lossy_hooks.study.traffic import TRAFFIC_KINDS, traffic_counts, traffic_states
from lossy_hooks.study.workloads.gpt import GPT, GPTStage, MoEBlocks, auxiliary_loss
from lossy_hooks.study.workloads.models import build_model, build_optimizer, logits

METRICS, BUCKETS, LAYERS = "metrics.csv", "buckets.csv", "layers.csv"


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
        self.fsdp = cfg.get("strategy", "ddp") == "fsdp"
        shape = MeshShape(world, *(int(cfg.get(kind) or 1) for kind in ("tp", "pp", "ep")))
        self.tp, self.pp, self.ep = shape.tp, shape.pp, shape.ep
        # a data-parallel replica: tp ranks x pp stages (expert parallelism is within dp)
        self.dp, self.dp_rank = shape.dp, shape.coords(rank)[0]
        # traffic beyond data parallelism: one state per type (loss 0 where it does not lose)
        self.traffic = traffic_states(cfg, self.seed, shape, rank)
        layout = model_parallel_layout(shape, self.traffic, TRAFFIC_KINDS, device.type)
        torch.manual_seed(self.seed)  # same initial model on every rank
        ep_group = layout.ep_group if layout is not None else None
        model = build_model(cfg["model"], data.num_classes, ep_group).to(device)
        if layout is not None and layout.pp_group is not None:  # this rank's stage of the model
            model = GPTStage(model, layout.stage, shape.pp)  # type: ignore[arg-type]
        self.module = model
        dp_group = layout.dp_group if layout is not None else None
        self.state = LossyState(**hook_kwargs(cfg, self.seed), process_group=dp_group)
        self.state.name_parameters(model)  # for --protect
        gathering = self.fsdp and cfg.get("all_gather_loss_rate", 0.0) > 0
        self.gather = fsdp_api().gather_state(**gather_kwargs(cfg, self.seed)) if gathering else None
        # DDP wraps the model; fully_shard turns it into its own FSDP module (self.ddp is self.module)
        self.ddp = parallelize(
            model,
            cfg["strategy"],
            self.state,
            self.gather,
            device,
            cfg["bucket_cap_mb"],
            layout,
            bool(cfg.get("sequence_parallel")),
        )
        # a model-parallel model: its parameters (this rank's shards, stage or experts) as
        # made here, checkpointed per rank (after a forward a tp model's DTensor ones are
        # module attributes under DDP, out of named_parameters()); FSDP with tp alone
        # gathers the whole model on rank 0 instead
        staged = layout is not None and (layout.pp_group is not None or layout.ep_group is not None)
        per_rank = layout is not None and (not self.fsdp or staged)
        self.local_params = list(model.named_parameters()) if per_rank else []
        if layout is not None:
            self.state.name_parameters(model)
        # --ep: the experts' gradients, reduced outside DDP or FSDP (1/dp: the mean they take)
        with_ep = layout is not None and layout.ep_group is not None
        self.experts = [p for _, p in expert_parameters(model)] if with_ep else []
        self.expert_replicas = layout.replica_group if layout is not None else None
        self.expert_scale = 1.0 / self.dp if cfg["reduction"] == "mean" else 1.0
        self.pipeline = None
        if layout is not None and layout.pp_group is not None:
            microbatches, schedule = cfg["accumulation_steps"], cfg.get("pp_schedule", "gpipe")
            self.pipeline = StagePipeline(model, self.ddp, layout, device, microbatches, schedule)
        self.opt = build_optimizer(cfg["optimizer"], self.ddp, cfg["learning_rate"])
        self.scaler = torch.amp.GradScaler(device.type, init_scale=cfg["amp_init_scale"], enabled=cfg["amp"])
        # per-replica data randomness: the tp ranks (pp stages) of a replica draw the same
        torch.manual_seed(derive_seed(self.seed, Stream.DATA, self.dp_rank))
        if not self.fsdp or self.pipeline is not None:  # FSDP rebuilds no buckets; a schedule
            self.warm_up()  # fixes its messages' shapes
        self.sampler, self.loader, self.val_loader = self.loaders()
        self.start_epoch, self.steps = 0, 0

    def loaders(self) -> tuple[DistributedSampler, DataLoader, DataLoader]:
        """This rank's training sampler and loader (its replica's share) and validation loader."""
        cfg, data, device = self.cfg, self.data, self.device
        workers = 0 if isinstance(data.train, torch.utils.data.TensorDataset) else cfg["workers"]
        sampler = DistributedSampler(data.train, self.dp, self.dp_rank, shuffle=True, seed=self.seed)
        loader = DataLoader(
            data.train,
            batch_size=cfg["batch_size"],
            sampler=sampler,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            drop_last=self.pipeline is not None,  # the schedule's shapes are fixed
        )
        # every sample exactly once per replica (its tp ranks run the same forward); under FSDP
        # or --ep every rank must run as many forward passes (they all-gather, or exchange
        # tokens), so the set is cut to a multiple of the dp size (< dp samples)
        even = self.fsdp or self.ep > 1
        val_end = len(data.val) // self.dp * self.dp if even else len(data.val)
        val_shard = Subset(data.val, range(self.dp_rank, val_end, self.dp))
        val_loader = DataLoader(val_shard, batch_size=cfg["batch_size"], num_workers=workers)
        return sampler, loader, val_loader

    def warm_up(self) -> None:
        """One lossless, uncounted iteration so DDP rebuilds its buckets (and a pipeline's
        schedule fixes its shapes) before the first real step: fresh and resumed runs then
        draw identical loss sequences."""
        gather = self.gather.passthrough() if self.gather is not None else contextlib.nullcontext()
        with self.state.passthrough(), self.traffic_passthrough(), gather:
            if self.pipeline is not None:  # of the training shapes (the schedule's first step)
                self.pipeline.warm_up(self.data.example_batch(self.cfg["batch_size"], self.device))
            else:
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
        traffic_columns, traffic_rows = traffic_counts(self.traffic, epoch)  # every rank
        columns |= traffic_columns  # tp_packets_sent, ...
        buckets += traffic_rows  # drop_point tp / pp / ep, bucket the collective kind
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
        if isinstance(self.module, MoEBlocks) and self.module.moe_layers():  # capacity drops (every rank)
            columns |= moe_columns(self.module, self.tp)
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
        if isinstance(self.module, MoEBlocks):
            self.module.reset_moe_counts()
        if self.pipeline is not None:
            return self.pipeline_epoch(epoch)
        acc_steps = cfg["accumulation_steps"]
        tally = EpochTally(dev)
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
                self.close_step(tally, i, n_batches, loss)
                if cfg["max_steps"] and self.steps >= cfg["max_steps"]:
                    break
        return tally.row(cfg, self.state, self.world, t0, self.tp)

    def pipeline_epoch(self, epoch: int) -> dict[str, Any]:
        """:meth:`train_epoch` under ``--pp``: every ``--accumulation_steps`` batches one step
        of the schedule (:class:`~lossy_hooks.study.pipelining.StagePipeline`); a short last
        group is left out (the schedule's micro-batches are fixed). The last stage tallies."""
        cfg, dev, pipeline = self.cfg, self.device, self.pipeline
        assert pipeline is not None
        tally, group = EpochTally(dev), pipeline.microbatches
        n_batches = len(self.loader) // group * group
        self.report.start_epoch(f"round {self.k} epoch {epoch + 1}/{cfg['num_epochs']}", n_batches)
        t0 = time.perf_counter()
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        for i, (x, y) in enumerate(self.loader):
            if i >= n_batches:
                break
            xs.append(x.to(dev, non_blocking=True))
            ys.append(y.to(dev, non_blocking=True))
            if len(xs) < group:
                continue
            done = pipeline.step(xs, ys)
            if done is not None:
                tally.add_micro_batch(done[0], done[1], done[2], sum(len(b) for b in ys))
            xs, ys = [], []
            self.close_step(tally, i, n_batches, done[0] if done is not None else None)
            if cfg["max_steps"] and self.steps >= cfg["max_steps"]:
                break
        return tally.row(cfg, self.state, self.world, t0, self.tp)

    def close_step(self, tally: EpochTally, i: int, n_batches: int, loss: torch.Tensor | None) -> None:
        """After the backward of an optimizer step's last micro-batch (batch ``i``): the
        experts' gradients (``--ep``), the optimizer step, the step's tallies and replica
        checks, the progress line."""
        cfg = self.cfg
        if self.experts:
            reduce_expert_gradients(self.experts, self.expert_replicas, self.expert_scale)
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
            shown = float(loss.detach()) if loss is not None else math.nan  # not a last stage
            self.report.update(i + 1, tally.processed * self.dp, shown, _rate(self.state.stats()))

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """Validation loss and accuracy (per token for a language model). Under FSDP the
        parameters are gathered without loss here, and tensor-parallel traffic is lossless:
        it measures the model training made. With ``--tp`` each replica's sums count ``tp``
        times in numerator and denominator alike (its tp ranks compute the same); with
        ``--pp`` the last stages sum."""
        self.module.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        lossless = self.gather.passthrough() if self.gather is not None else contextlib.nullcontext()
        with lossless, self.traffic_passthrough():
            for x, y in self.val_loader:
                x, y = x.to(self.device), y.to(self.device)
                if self.pipeline is not None:  # the logits on the last stage only
                    staged = self.pipeline.forward(x)
                    if staged is None:
                        continue
                    out = staged
                else:
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


def moe_columns(model: GPT | GPTStage, copies: int) -> dict[str, Any]:
    """metrics.csv's ``moe_dropped_slots``, ``moe_routed_slots`` and ``moe_drop_rate``: the
    token-slots the MoE layers' capacity dropped in the epoch's training forwards, summed over
    the ranks (a collective; each of ``copies`` tp ranks of a replica routes the same tokens)."""
    counts = model.moe_slot_counts()
    device = next(model.parameters()).device
    totals = counts.double() if counts is not None else torch.zeros(2, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    dropped, routed = (round(float(v) / copies) for v in totals)
    rate = dropped / max(routed, 1)
    return {"moe_dropped_slots": dropped, "moe_routed_slots": routed, "moe_drop_rate": rate}

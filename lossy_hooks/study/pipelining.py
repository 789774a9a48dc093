r"""Pipeline parallelism in the study (``--pp N``): one rank's stage of the GPT, its
schedule (``--pp_schedule``: GPipe or 1F1B) over the lossy pipeline group, a training step
over an optimizer step's micro-batches, and the validation forward.

The schedules (:data:`PP_SCHEDULES`) run the same micro-batches through the same stages and
send the same messages; they differ in order only. GPipe runs every forward, then every
backward (a stage keeps the activations of all ``A`` micro-batches); 1F1B, after ``pp - s``
warm-up forwards on stage ``s``, alternates one forward and one backward (at most ``pp - s``
micro-batches in flight, ``A >= pp`` needed). A step's gradients are the same sums in
another order; under loss the group draws its packets in the order of its sends and
receives, which differs: the same rate on the same messages, not the same packets.

A step takes the ``A = --accumulation_steps`` micro-batches of one optimizer step (each
``--batch_size`` sequences) as the pipeline's ``A`` micro-batches: the first stage feeds the
tokens, every stage sends its hidden states ``(B, T, n_embd)`` to the next over the pp
group (point-to-point: what ``--traffic_loss pp=...`` loses), the last computes each
micro-batch's mean cross-entropy :math:`\ell_m`, and the backward sends the gradients of
the hidden states back. ``torch.distributed.pipelining`` divides the gradients by ``A``
(``scale_grads``), so a step's gradient is :math:`\nabla \frac1A \sum_m \ell_m`, the same
as ``A`` accumulated micro-batches without pipelining; DDP reduces each stage's gradients
over its dp group once per step (the schedule runs the other micro-batches' backward under
``no_sync``). The schedule infers the messages' shapes at its first step: every step has
``A`` micro-batches of ``B`` sequences (the loader drops a short last batch, the epoch a
short last group). Validation runs stage by stage over the same group's sends and receives
(batches of any size; the traffic state lossless then).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from lossy_hooks.study.parallel import MeshLayout

__all__ = ["PP_SCHEDULES", "StagePipeline"]

PP_SCHEDULES = ("gpipe", "1f1b")  # torch.distributed.pipelining's ScheduleGPipe, Schedule1F1B


def _mean_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A micro-batch's loss: the mean cross-entropy per token."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


class StagePipeline:
    """This rank's stage (``stage``: a ``GPTStage``; ``wrapped``: it under DDP) in a
    ``schedule`` (one of :data:`PP_SCHEDULES`) of ``microbatches`` micro-batches over
    ``layout.pp_group`` (its stage ``layout.stage``; with ``--tp`` too, the tp ranks of a
    stage each run the schedule with their own pp group, ranks ``t`` of every stage)."""

    def __init__(
        self,
        stage: nn.Module,
        wrapped: nn.Module,
        layout: MeshLayout,
        device: torch.device,
        microbatches: int,
        schedule: str = "gpipe",
    ) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if schedule not in PP_SCHEDULES:
            raise ValueError(f"--pp_schedule must be one of {', '.join(PP_SCHEDULES)}, got {schedule!r}")
        self.stage, self.wrapped, self.layout, self.device = stage, wrapped, layout, device
        stages = layout.shape.pp
        self.first, self.last = layout.stage == 0, layout.stage == stages - 1
        self.microbatches = microbatches
        pipe_stage = PipelineStage(wrapped, layout.stage, stages, device, group=layout.pp_group)
        kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        self.schedule = kind(pipe_stage, n_microbatches=microbatches, loss_fn=_mean_cross_entropy)

    def warm_up(self, x: torch.Tensor) -> None:
        """The round's warm-up (every traffic state lossless and uncounted, the caller's):
        first a forward and backward of this stage alone (the input stands in for the hidden
        states before it), so that DDP rebuilds its buckets from ONE backward (measured on
        torch 2.14: rebuilding after the schedule's micro-batches fails an internal assert,
        their backward passes recording each parameter once per micro-batch); then a step of
        the schedule on ``microbatches`` copies of ``x``, which fixes the messages' shapes."""
        shape = self.stage.message_shape(x.shape)
        h = x if self.first else torch.zeros(shape, device=self.device, requires_grad=True)
        self.wrapped(h).float().sum().backward()
        self.step([x] * self.microbatches, [x] * self.microbatches)

    def step(
        self, inputs: list[torch.Tensor], targets: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """Forward and backward of one optimizer step's micro-batches (every stage passes the
        same ``inputs`` and ``targets``, ``microbatches`` of each): on the last stage the mean
        of the micro-batches' losses, the correct next-token predictions and the tokens;
        ``None`` on the others."""
        x, y = torch.cat(inputs), torch.cat(targets)
        losses: list[torch.Tensor] = []
        if self.first and self.last:
            out = self.schedule.step(x, target=y, losses=losses)
        elif self.first:
            out = self.schedule.step(x)
        elif self.last:
            out = self.schedule.step(target=y, losses=losses)
        else:
            out = self.schedule.step()
        if not self.last:
            return None
        hits = (out.argmax(-1) == y).sum()
        return torch.stack(losses).mean().detach(), hits, y.numel()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The logits of token ids ``x`` ``(B, T)`` on the last stage (``None`` elsewhere): each
        stage receives the hidden states (``GPTStage.message_shape``: ``(B, T, width)``, with
        sequence parallelism this rank's ``T / tp`` positions) from the one before, runs its
        blocks and sends them on (every stage of the pipeline calls it with the same batch)."""
        group, stage = self.layout.pp_group, self.layout.stage
        if self.first:
            h = x
        else:
            h = torch.empty(self.stage.message_shape(x.shape), device=self.device)
            dist.recv(h, group=group, group_src=stage - 1)
        out = self.stage(h)
        if self.last:
            return out
        dist.send(out.contiguous(), group=group, group_dst=stage + 1)
        return None

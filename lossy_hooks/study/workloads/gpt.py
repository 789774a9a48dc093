"""A small decoder-only transformer (GPT-style) over bytes, for the language-model workload
of train_ddp.py (``--model gpt-tiny|gpt-small|gpt-medium``, and the mixture-of-experts
variants ``moe-tiny|moe-small``). :data:`GPT_CONFIGS` is the one registry of the language
models: a name is a language model iff it is a key there.

Pre-norm blocks of causal self-attention (``scaled_dot_product_attention``) and a 4x GELU
MLP, learned positions, untied input and output embeddings (so that FSDP can shard the
blocks, the embeddings and the head as separate units without a shared parameter). Weights
``N(0, 0.02)``, output projections of each block ``N(0, 0.02 / sqrt(2 L))`` (GPT-2's
scaling for a residual stream of ``2 L`` additions). The vocabulary is the 256 byte values.

A configuration with ``moe`` (a :class:`~lossy_hooks.study.workloads.moe.MoEConfig`) puts an
MoE layer (:mod:`lossy_hooks.study.workloads.moe`) in every block in place of the MLP; its
forward leaves ``model.aux_loss`` = ``aux_coef`` times the sum over the layers of their
load-balancing losses (the training objective adds it: :func:`auxiliary_loss`), and
:meth:`GPT.moe_slot_counts` sums the layers' dropped and routed token-slots. A dense model's
``aux_loss`` is ``None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn import functional as F

from lossy_hooks.study.workloads.moe import MoEConfig, MoELayer

__all__ = [
    "GPT",
    "GPT_CONFIGS",
    "GPTConfig",
    "GPTStage",
    "MoEBlocks",
    "auxiliary_loss",
    "build_gpt",
    "tensor_parallel",
]


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # context length in tokens (bytes)
    vocab_size: int = 256
    moe: MoEConfig | None = None  # an MoE layer in place of each block's MLP


GPT_CONFIGS = {
    "gpt-tiny": GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64),
    "gpt-small": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "gpt-medium": GPTConfig(n_layer=6, n_head=8, n_embd=256, block_size=256),
    # gpt-tiny and gpt-small with E experts, top-2, capacity factor 1.25 in every block
    "moe-tiny": GPTConfig(2, 4, 64, 64, moe=MoEConfig(n_expert=4, top_k=2, capacity_factor=1.25)),
    "moe-small": GPTConfig(4, 4, 128, 128, moe=MoEConfig(n_expert=8, top_k=2, capacity_factor=1.25)),
}


class CausalSelfAttention(nn.Module):
    """Causal self-attention of ``n_head`` heads of ``n_embd / n_head`` channels. The forward
    reads the widths from the tensors, so the same module runs tensor-parallel: with ``qkv``
    column-sharded as ``[q_r; k_r; v_r]`` per rank (``tensor_parallel_plan``) and ``proj``
    row-sharded, a rank computes its ``n_head / tp`` heads."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=2)  # this rank's heads (all of them without tp)
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    """``x + attn(ln1 x)``, then ``+ mlp(ln2 x)``: the dense MLP (``fc``, ``proj``) or, with
    ``cfg.moe``, the MoE layer ``moe`` (its experts sharded over ``ep_group`` if given)."""

    def __init__(self, cfg: GPTConfig, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        if cfg.moe is None:
            self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
            self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        else:
            std = 0.02 / math.sqrt(2 * cfg.n_layer)
            self.moe = MoELayer(cfg.n_embd, cfg.moe, proj_std=std, ep_group=ep_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        if hasattr(self, "moe"):
            return x + self.moe(self.ln2(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class MoEBlocks:
    """What a :class:`GPT` and its pipeline stages (:class:`GPTStage`) share: the MoE layers
    of their ``blocks``, their weighted load-balancing loss and their capacity counters."""

    blocks: nn.ModuleList
    cfg: GPTConfig

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers, one per block (none in a dense GPT)."""
        return [block.moe for block in self.blocks if hasattr(block, "moe")]

    def blocks_aux_loss(self) -> torch.Tensor | None:
        r"""``aux_coef`` times the sum of the blocks' load-balancing losses of the last forward,
        :math:`c \sum_l L_{aux,l}` (``None`` for a dense model)."""
        layers = self.moe_layers()
        if self.cfg.moe is None or not layers:
            return None
        return self.cfg.moe.aux_coef * torch.stack([m.aux_loss for m in layers]).sum()

    def moe_slot_counts(self) -> torch.Tensor | None:
        """``(dropped, routed)`` token-slots of the training forwards since
        :meth:`reset_moe_counts`, summed over the MoE layers (an int64 device tensor; ``None``
        before the first forward or for a dense GPT). Read it at epoch end: a host sync."""
        counts = [m.slot_counts for m in self.moe_layers() if m.slot_counts is not None]
        return torch.stack(counts).sum(0) if counts else None

    def reset_moe_counts(self) -> None:
        """Start every MoE layer's slot counters over."""
        for m in self.moe_layers():
            m.reset_counts()


class GPT(MoEBlocks, nn.Module):
    """``forward(idx)``: token ids ``(B, T)``, ``T <= block_size`` -> logits ``(B, T, vocab)``."""

    def __init__(self, cfg: GPTConfig, ep_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.aux_loss: torch.Tensor | None = None
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, ep_group) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.cfg.block_size:
            raise ValueError(f"sequence of {t} tokens, the model's context is {self.cfg.block_size}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        self.aux_loss = self.blocks_aux_loss()
        return self.head(self.ln_f(x))


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """The auxiliary loss the last forward of ``model`` (a GPT, or whatever else trains) left
    to be added to the training objective: an MoE GPT's weighted load-balancing loss, else
    ``None``."""
    aux = getattr(model, "aux_loss", None)
    return aux if isinstance(aux, torch.Tensor) else None


def build_gpt(name: str, ep_group: dist.ProcessGroup | None = None) -> GPT:
    """A randomly initialised GPT of one of :data:`GPT_CONFIGS` (seed it before calling; the
    same seed on every rank). ``ep_group``: an MoE model's experts are sharded over its ranks
    (its size must divide the number of experts); refused for a dense model."""
    if name not in GPT_CONFIGS:
        raise ValueError(f"--model {name!r}: the language models are {', '.join(GPT_CONFIGS)}")
    cfg = GPT_CONFIGS[name]
    if ep_group is not None and cfg.moe is None:
        raise ValueError(f"--model {name!r} has no experts: expert parallelism needs an MoE model (moe-*)")
    return GPT(cfg, ep_group)


def tensor_parallel(
    model: GPT | GPTStage, tp_mesh: DeviceMesh, sequence_parallel: bool = False
) -> GPT | GPTStage:
    """Megatron-style tensor parallelism of ``model``'s blocks (a GPT's, or a pipeline stage's:
    ``--tp`` with ``--pp``) over ``tp_mesh`` (DTensor's
    ``parallelize_module``), in place: in each block ``attn.qkv`` and ``fc`` column-sharded,
    ``attn.proj`` and ``proj`` row-sharded, so that each block's forward ends its attention
    and its MLP with one all-reduce of the activations over the tp group and its backward
    starts them with one all-reduce of their gradients; embeddings, norms and the head stay
    replicated. ``qkv``'s rows are first reordered from ``[q; k; v]`` to ``[q_0; k_0; v_0;
    q_1; ...]`` (``q_r`` the heads of rank ``r``), so that a column shard holds whole heads of
    all three: the model computes the same function (its parameters permuted). Refuses a tp
    size that does not divide the heads.

    ``sequence_parallel`` (``--sequence_parallel``, Megatron-LM's sequence parallelism, as
    torchtitan's plan): between the row- and the column-sharded layers the residual stream
    is split along the sequence, rank ``r`` holding positions ``[r T/tp, (r+1) T/tp)``
    (``tp`` must divide the sequences' ``T = block_size``: DTensor's local shards are even),
    and the blocks' norms (``ln1``, ``ln2``) run on their rank's positions
    (``SequenceParallel``: replicated weights, their gradients' partial sums
    all-reduced over the tp group). Each sublayer's all-reduce becomes an all-gather of the
    sequence before its column-sharded layer and a reduce-scatter after its row-sharded one
    (forward; in the backward each one's adjoint: a reduce-scatter and an all-gather), each
    of ``1/tp`` the all-reduce's tensor: per block and step 4 all-gathers and 4
    reduce-scatters in place of 4 all-reduces (tests/multiprocess/test_group.py). The stream
    is split after the embeddings, entering the model's first block (a local slice; its
    backward all-gathers the gradient), and gathered before the final norm and head, leaving
    its last block (an all-gather; its backward a local slice): embeddings, ``ln_f`` and head
    see whole sequences as without it. Between pipeline stages the stream stays split (as
    Megatron-LM's): a stage without the embeddings takes, and one without the head sends,
    its rank's ``(B, T/tp, C)`` positions (:attr:`GPTStage.sequence_shards` = ``tp``). An MoE
    layer (experts whole on every rank) takes the gathered sequence and returns its rank's
    positions (with ``--ep`` refused: every tp rank would exchange every token, of which it
    keeps ``1/tp``)."""
    tp, cfg = tp_mesh.size(), model.cfg
    if cfg.n_head % tp:
        raise ValueError(f"--tp {tp} must divide the model's {cfg.n_head} attention heads")
    if sequence_parallel and cfg.block_size % tp:
        raise ValueError(
            f"--sequence_parallel: --tp {tp} must divide the model's {cfg.block_size}-token sequences"
        )
    plan: dict[str, ParallelStyle] = {}
    seq, whole = Shard(1), Replicate()
    for i, block in enumerate(model.blocks):
        qkv = block.attn.qkv
        with torch.no_grad():
            qkv.weight.copy_(qkv.weight.view(3, tp, -1, cfg.n_embd).transpose(0, 1).reshape(-1, cfg.n_embd))
            qkv.bias.copy_(qkv.bias.view(3, tp, -1).transpose(0, 1).reshape(-1))
        dense = hasattr(block, "fc")  # a dense MLP (an MoE block's experts stay whole on each rank)
        plan[f"blocks.{i}.attn.qkv"] = ColwiseParallel()
        if not sequence_parallel:
            plan[f"blocks.{i}.attn.proj"] = RowwiseParallel()
            if dense:
                plan[f"blocks.{i}.fc"], plan[f"blocks.{i}.proj"] = ColwiseParallel(), RowwiseParallel()
            continue
        plan[f"blocks.{i}.ln1"] = plan[f"blocks.{i}.ln2"] = SequenceParallel(use_local_output=True)
        # the attention reads (B, T) from its input: it gets the gathered sequence, a DTensor
        # (qkv takes it as is: the gather's backward is a reduce-scatter, not an all-reduce)
        plan[f"blocks.{i}.attn"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(whole,))
        plan[f"blocks.{i}.attn.proj"] = RowwiseParallel(output_layouts=seq)
        if dense:
            plan[f"blocks.{i}.fc"] = ColwiseParallel(input_layouts=seq)
            plan[f"blocks.{i}.proj"] = RowwiseParallel(output_layouts=seq)
        else:
            plan[f"blocks.{i}.moe"] = _converted(seq, whole)  # run on the gathered sequence
        ends = {"input": i == 0 and model.tok is not None, "output": i == len(model.blocks) - 1}
        ends["output"] &= model.head is not None
        if any(ends.values()):
            plan[f"blocks.{i}"] = _stream_ends(seq, whole, **ends)
    parallelize_module(model, tp_mesh, plan)
    if sequence_parallel and isinstance(model, GPTStage):
        model.sequence_shards = tp
    return model


def _converted(outside: Shard | Replicate, inside: Shard | Replicate) -> ParallelStyle:
    """A module whose input arrives laid out as ``outside`` and is run as ``inside``, its
    output turned back from ``inside`` to ``outside`` (local tensors in and out)."""
    return PrepareModuleInputOutput(
        input_layouts=(outside,),
        desired_input_layouts=(inside,),
        output_layouts=(inside,),
        desired_output_layouts=(outside,),
        use_local_input=True,
        use_local_output=True,
    )


def _stream_ends(seq: Shard, whole: Replicate, input: bool, output: bool) -> ParallelStyle:
    """The first block's input sliced to this rank's positions and/or the last block's
    output gathered (a one-block model or stage: both)."""
    if input and output:
        return _converted(whole, seq)
    if input:
        return PrepareModuleInput(input_layouts=(whole,), desired_input_layouts=(seq,), use_local_output=True)
    return PrepareModuleOutput(output_layouts=(seq,), desired_output_layouts=(whole,), use_local_output=True)


class _WithAuxLoss(torch.autograd.Function):
    r"""``forward(x, aux) = x``; in the backward ``x``'s gradient passes and ``aux`` gets 1: the
    auxiliary loss joins the objective of whatever loss ``x`` reaches, :math:`\ell + aux`
    (a pipeline stage's load balancing, which has no loss of its own; Megatron-LM's
    ``MoEAuxLossAutoScaler`` at scale 1: the schedule's ``1/A`` then divides both)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_like = (aux.shape, aux.dtype, aux.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype, device = ctx.aux_like
        return grad, torch.ones(shape, dtype=dtype, device=device)


class GPTStage(MoEBlocks, nn.Module):
    r"""Stage ``stage`` of ``stages`` of a :class:`GPT` for pipeline parallelism: blocks
    ``[stage * L / stages, (stage + 1) * L / stages)`` (the first ``L mod stages`` stages one
    more), the first stage also the embeddings (token ids in), the last also the final norm
    and the head (logits out); between stages the ``(B, T, n_embd)`` hidden states travel
    (``torch.distributed.pipelining`` sends them, and their gradients back). The stages in
    order compute the model's forward exactly (the same modules, the same ops). An MoE
    model's stage attaches its blocks' weighted load-balancing loss to its output
    (:class:`_WithAuxLoss`), so that the schedule's backward of each micro-batch's loss
    :math:`\ell_m` is the backward of :math:`\ell_m + \sum_{stages} aux_m`, the objective
    of the model without pipelining."""

    def __init__(self, model: GPT, stage: int, stages: int) -> None:
        super().__init__()
        n = model.cfg.n_layer
        if not 1 <= stages <= n:
            raise ValueError(f"--pp {stages} must be between 1 and the model's {n} layers")
        bounds = [k * (n // stages) + min(k, n % stages) for k in range(stages + 1)]
        self.first, self.last = stage == 0, stage == stages - 1
        self.cfg = model.cfg  # its widths (tensor_parallel reads them)
        self.width = model.cfg.n_embd  # of the hidden states between stages
        self.tok = model.tok if self.first else None
        self.pos = model.pos if self.first else None
        self.blocks = nn.ModuleList(model.blocks[bounds[stage] : bounds[stage + 1]])
        self.ln_f = model.ln_f if self.last else None
        self.head = model.head if self.last else None
        self.sequence_shards = 1  # tp under sequence parallelism: messages of T / tp positions

    def message_shape(self, tokens: torch.Size) -> tuple[int, ...]:
        """The hidden states this stage receives or sends for token ids of shape ``(B, T)``:
        ``(B, T / sequence_shards, width)``."""
        b, t = tokens
        return (b, t // self.sequence_shards, self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok is not None and self.pos is not None:
            x = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            x = block(x)
        aux = self.blocks_aux_loss()
        if aux is not None and torch.is_grad_enabled():
            x = _WithAuxLoss.apply(x, aux)
        if self.head is not None and self.ln_f is not None:
            x = self.head(self.ln_f(x))
        return x

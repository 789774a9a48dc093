r"""The mixture-of-experts feed-forward layer of the MoE GPT (``--model moe-tiny|moe-small``):
it takes the place of a block's dense 4x GELU MLP.

Routing (per token :math:`x_n`, :math:`n = b T + t` its position in this rank's batch):
router logits :math:`z_n = W_r x_n` (a bias-free linear), probabilities
:math:`p_n = \mathrm{softmax}(z_n)` (in fp32 at least), the top-:math:`k` experts
:math:`e_{n,1}, \dots, e_{n,k}` (:math:`k \in \{1, 2\}`) and their gates: :math:`k = 1`:
:math:`g_{n,1} = p_{n,e_{n,1}}` (Switch: the raw probability, so the router learns through
it); :math:`k = 2`: :math:`g_{n,j} = p_{n,e_{n,j}} / (p_{n,e_{n,1}} + p_{n,e_{n,2}})`.
Each pair :math:`(n, j)` is a *token-slot*.

Capacity: expert :math:`e` takes at most :math:`c = \lceil C k N / E \rceil` token-slots of
the :math:`N` tokens of one forward on one rank (``capacity_factor`` :math:`C`). Priority:
all first choices before any second choice, and within one choice by position :math:`n`
(the slots in the order :math:`s = j N + n`); slot :math:`s` routed to :math:`e` is kept
iff fewer than :math:`c` earlier slots went to :math:`e`. A dropped slot contributes 0 (the
other slot of a :math:`k = 2` token keeps its gate, not renormalised again); the block's
residual carries the token on. The output is
:math:`y_n = \sum_j [\text{kept}]\, g_{n,j}\, \mathrm{FFN}_{e_{n,j}}(x_n)`, with
:math:`\mathrm{FFN}_e(x) = W_{2,e}\,\mathrm{GELU}(W_{1,e} x + b_{1,e}) + b_{2,e}`.

Load balance (Switch Transformer): :math:`L_{aux} = E \sum_e f_e P_e`, :math:`f_e` the
fraction of the :math:`kN` token-slots whose choice is :math:`e` (before capacity),
:math:`P_e = \frac1N \sum_n p_{n,e}`; 1 when balanced; gradient through :math:`P_e` only.
The layer keeps it in ``aux_loss``; the GPT sums its layers times ``aux_coef``.

Experts run as one batched matmul over an ``(E, M, d)`` buffer (slot :math:`s` at row
``pos`` of expert :math:`e`, empty rows zero and never read back): no loop over tokens or
experts and, all experts local, no host synchronisation.

Expert parallelism (``ep_group`` of :math:`P` ranks, :math:`P \mid E`): rank :math:`q`
holds experts :math:`[qE/P, (q+1)E/P)`; each rank routes *its own* tokens (capacity per
source rank, as above). Forward: (1) the kept slots sorted by expert, hence by owning rank;
(2) the per-expert counts exchanged by an int64 ``all_to_all_single`` (control traffic: a
lossy group never loses integer tensors); (3) **one host read** of those counts per layer
per forward (uneven ``all_to_all_single`` takes its split sizes as Python ints; torchtitan
reads them too); (4) *dispatch*: the slots' token vectors, one ``all_to_all_single`` with
uneven splits; (5) the local experts on what arrived; (6) *combine*: the outputs back by a
second ``all_to_all_single`` with the splits swapped; (7) gate and sum per token. Both data
all-to-alls are autograd ops (``torch.distributed._functional_collectives``), whose backward
is the same all-to-all with the splits swapped: four data all-to-alls per layer per step,
each through the group's backend, so a :func:`lossy_hooks.lossy_group` group loses
packets of dispatch and combine, forward and backward. With the zero fill, a lost dispatched
packet zeroes those token vectors at the expert (its output is then the expert applied to
0 rows, i.e. a bias-only value, gated); a lost combine packet zeroes those expert outputs at
their token (that slot's contribution is missing, the residual passes); lost backward
packets zero the corresponding gradient rows.

Counters: ``slot_counts``, an int64 device tensor ``(dropped, routed)`` of token-slots summed
over the training forwards since :meth:`MoELayer.reset_counts` (read at epoch end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

__all__ = ["MoEConfig", "MoELayer", "Routing", "expert_capacity", "route"]


@dataclass(frozen=True)
class MoEConfig:
    """The MoE part of a GPT's configuration: ``n_expert`` E, ``top_k`` (1 or 2),
    ``capacity_factor`` C and ``aux_coef``, the weight of the load-balancing loss."""

    n_expert: int
    top_k: int = 2
    capacity_factor: float = 1.25
    aux_coef: float = 0.01

    def __post_init__(self) -> None:
        if self.top_k not in (1, 2) or self.top_k > self.n_expert:
            raise ValueError(f"MoE top_k must be 1 or 2 and <= n_expert, got {self.top_k}")
        if self.capacity_factor <= 0:
            raise ValueError(f"MoE capacity_factor must be > 0, got {self.capacity_factor}")


def expert_capacity(tokens: int, n_expert: int, top_k: int, factor: float) -> int:
    """:math:`\\lceil C k N / E \\rceil` token-slots per expert per forward (a host int: N is
    a shape)."""
    return math.ceil(factor * top_k * tokens / n_expert)


@dataclass
class Routing:
    """One forward's routing of ``N`` tokens, slots in priority order ``s = j N + n``:
    ``token`` (kN,) n, ``expert`` (kN,) e, ``gate`` (kN,) g (0 where dropped), ``pos`` (kN,)
    the slot's rank among the slots of its expert, ``keep`` (kN,) ``pos < capacity``,
    ``aux_loss`` the unweighted :math:`E \\sum_e f_e P_e`, ``capacity`` c."""

    token: torch.Tensor
    expert: torch.Tensor
    gate: torch.Tensor
    pos: torch.Tensor
    keep: torch.Tensor
    aux_loss: torch.Tensor
    capacity: int


def route(logits: torch.Tensor, top_k: int, capacity_factor: float) -> Routing:
    """Softmax top-k routing with capacity (see the module) of router logits ``(N, E)``."""
    n, e = logits.shape
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
    top_p, top_e = probs.topk(top_k, dim=-1)  # (N, k), descending
    gates = top_p if top_k == 1 else top_p / top_p.sum(dim=-1, keepdim=True)
    expert = top_e.t().reshape(-1)  # slot s = j N + n
    token = torch.arange(n, device=logits.device).repeat(top_k)
    onehot = F.one_hot(expert, e)  # (kN, E)
    pos = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # earlier slots of the same expert
    capacity = expert_capacity(n, e, top_k, capacity_factor)
    keep = pos < capacity
    gate = gates.t().reshape(-1) * keep
    f = onehot.sum(dim=0).to(probs.dtype) / (top_k * n)
    aux = e * (f * probs.mean(dim=0)).sum()
    return Routing(token, expert, gate, pos, keep, aux, capacity)


class MoELayer(nn.Module):
    """``forward(x)``: ``(B, T, d)`` -> ``(B, T, d)``, the MoE feed-forward of the module
    docstring; its experts ``[lo, lo + E/P)`` on this rank of ``ep_group`` (all of them
    without one). ``proj_std`` is the std of the experts' output projections (GPT-2's
    ``0.02 / sqrt(2 L)``). Every rank draws all E experts' initial weights from the same
    stream and keeps its own: with one seed, the expert-parallel layer is the all-local one,
    sharded."""

    # the parameters of the experts (sharded over ``ep_group``; the router is replicated)
    EXPERT_PARAMETERS = ("w_fc", "b_fc", "w_proj", "b_proj")

    def __init__(
        self, n_embd: int, cfg: MoEConfig, proj_std: float = 0.02, ep_group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.ep_group = ep_group
        e, d, h = cfg.n_expert, n_embd, 4 * n_embd
        ranks = dist.get_world_size(ep_group) if ep_group is not None else 1
        if e % ranks:
            raise ValueError(f"expert parallelism over {ranks} ranks must divide the {e} experts")
        self.local = e // ranks
        self.lo = (dist.get_rank(ep_group) if ep_group is not None else 0) * self.local
        self.router = nn.Linear(d, e, bias=False)
        nn.init.normal_(self.router.weight, 0.0, 0.02)
        local = slice(self.lo, self.lo + self.local)
        self.w_fc = nn.Parameter(torch.empty(e, d, h).normal_(0.0, 0.02)[local].clone())
        self.b_fc = nn.Parameter(torch.zeros(self.local, h))
        self.w_proj = nn.Parameter(torch.empty(e, h, d).normal_(0.0, proj_std)[local].clone())
        self.b_proj = nn.Parameter(torch.zeros(self.local, d))
        self.aux_loss: torch.Tensor | None = None
        self.slot_counts: torch.Tensor | None = None  # (dropped, routed), training forwards

    def reset_counts(self) -> None:
        """Start the ``slot_counts`` over (at epoch start)."""
        self.slot_counts = None

    def experts(self, buf: torch.Tensor) -> torch.Tensor:
        """The local experts on ``buf`` ``(E_local, M, d)``: row ``m`` of expert ``l`` is
        :math:`W_{2,l}\\,\\mathrm{GELU}(W_{1,l} x + b_{1,l}) + b_{2,l}` (two batched matmuls)."""
        hidden = F.gelu(torch.baddbmm(self.b_fc.unsqueeze(1), buf, self.w_fc))
        return torch.baddbmm(self.b_proj.unsqueeze(1), hidden, self.w_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        r = route(self.router(tokens), self.cfg.top_k, self.cfg.capacity_factor)
        self.aux_loss = r.aux_loss
        if self.training:
            with torch.no_grad():
                dropped = (~r.keep).sum()
                counts = torch.stack([dropped, torch.full_like(dropped, r.keep.numel())])
                self.slot_counts = counts if self.slot_counts is None else self.slot_counts + counts
        if self.ep_group is None:
            out = self._local(tokens, r)
        else:
            out = self._expert_parallel(tokens, r)
        return out.to(x.dtype).reshape(b, t, d)

    def _local(self, tokens: torch.Tensor, r: Routing) -> torch.Tensor:
        """All experts here: slot ``s`` at row ``pos_s`` of expert ``e_s`` in an
        ``(E, c + 1, d)`` buffer (dropped slots in the spare last row, cut off before the
        experts and read back as 0); gated outputs summed per token."""
        e, c, d = self.cfg.n_expert, r.capacity, tokens.shape[1]
        row = torch.where(r.keep, r.pos, torch.full_like(r.pos, c))
        buf = tokens.new_zeros(e, c + 1, d).index_put((r.expert, row), tokens[r.token], accumulate=True)
        out = F.pad(self.experts(buf[:, :c]), (0, 0, 0, 1))  # the spare row reads 0
        back = out[r.expert, row] * r.gate.unsqueeze(1).to(out.dtype)
        return tokens.new_zeros(tokens.shape).index_add(0, r.token, back.to(tokens.dtype))

    def _exchange_counts(self, r: Routing) -> tuple[torch.Tensor, list[int], list[int], int]:
        """Per-expert kept counts of this rank (E,), the counts received ``(P, E_local)``
        (device), the send and receive split sizes and the most rows any local expert gets:
        an int64 all-to-all (control traffic) and the layer's one host read."""
        e, ranks = self.cfg.n_expert, dist.get_world_size(self.ep_group)
        sent = torch.zeros(e, dtype=torch.int64, device=r.expert.device)
        sent.index_add_(0, r.expert, r.keep.to(torch.int64))
        got = torch.empty_like(sent)
        dist.all_to_all_single(got, sent, group=self.ep_group)  # got[q E_l + l]: from q to my l
        got = got.view(ranks, self.local)
        host = torch.cat([sent.view(ranks, self.local).sum(1), got.sum(1), got.sum(0)]).tolist()
        in_splits, out_splits = host[:ranks], host[ranks : 2 * ranks]
        return got, in_splits, out_splits, max(host[2 * ranks :], default=0)

    def _all_to_all(self, rows: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        """The autograd all-to-all of ``rows`` (split by ``in_splits``) over ``ep_group``:
        its backward is the all-to-all of the gradients with the splits swapped, through the
        same group's backend (what a lossy group sees). Imported here: a model without expert
        parallelism needs no functional collectives."""
        import torch.distributed._functional_collectives as funcol

        moved = funcol.all_to_all_single_autograd(rows, out_splits, in_splits, self.ep_group)
        return funcol.wait_tensor(moved)

    def _expert_parallel(self, tokens: torch.Tensor, r: Routing) -> torch.Tensor:
        """Dispatch, local experts, combine (see the module): the kept slots sorted by expert
        (stable: priority order within an expert) travel to the experts' ranks; what arrives,
        ordered by (source, local expert, slot), is placed at row
        ``sum_{q' < q} got[q', l] + i`` of local expert ``l`` (``i``: its index among the
        rows from source ``q`` to ``l``) of an ``(E_local, M, d)`` buffer."""
        got, in_splits, out_splits, most = self._exchange_counts(r)
        key = torch.where(r.keep, r.expert, torch.full_like(r.expert, self.cfg.n_expert))
        order = key.argsort(stable=True)[: sum(in_splits)]
        sent = tokens[r.token[order]]
        arrived = self._all_to_all(sent, out_splits, in_splits)  # dispatch
        n_in = sum(out_splits)
        flat = got.reshape(-1)
        seg = torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), flat, output_size=n_in)
        seg_start = flat.cumsum(0) - flat
        col_start = (got.cumsum(0) - got).reshape(-1)  # rows of earlier sources, per local expert
        row = col_start[seg] + torch.arange(n_in, device=flat.device) - seg_start[seg]
        expert = seg % self.local
        buf = arrived.new_zeros(self.local, most, tokens.shape[1]).index_put((expert, row), arrived)
        done = self.experts(buf)[expert, row]
        back = self._all_to_all(done, in_splits, out_splits)  # combine
        back = back * r.gate[order].unsqueeze(1).to(back.dtype)
        return tokens.new_zeros(tokens.shape).index_add(0, r.token[order], back.to(tokens.dtype))

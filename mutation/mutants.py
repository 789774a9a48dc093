"""Curated mutation testing: does the suite notice when a rule breaks?

    python mutation/mutants.py                 # every mutant (~90 min on 2 cores: 10-175 s a mutant)
    python mutation/mutants.py --list          # the mutants and the rule each one breaks
    python mutation/mutants.py --only M07 M12  # some of them
    python mutation/mutants.py --json out.json

Each mutant is one small, deliberate bug in the package or the study script that breaks one
rule of docs/semantics.md (or of the script's documented behaviour). The runner copies the
tracked tree (plus new, unignored files) to a temporary folder once, and for each mutant
applies it there, runs the tests that pin that rule, and restores the file. A mutant is
*killed* when those tests fail. The score is killed / all; the target is >= 90%, and every
survivor is listed in docs/testing.md with why it is acceptable.

Why curated and not mutmut/cosmic-ray: their mutants run a test command each, and ours
launch multi-process DDP groups (20-60 s a run); a few thousand generated mutants would take
days here. The curated list names a rule per mutant and the tests that own it, so a run
takes minutes and a survivor says which rule has no test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# test selections (pytest arguments), cheapest first
# test selections: each one pytest run (its own -k); a mutant lists the ones that own its rule
HOOK = ("tests/multiprocess/test_hook_ddp.py", "-k", "W3")  # one 3-rank launch of every DDP scenario
UNIT = (
    "tests/unit/test_loss_models.py",
    "tests/unit/test_packetization_state.py",
    "tests/unit/test_no_host_sync.py",
)
RUN_IO = ("tests/unit/test_run_io.py",)
OPTIONS = (
    "tests/unit/test_protection_encoding.py",
    "tests/unit/test_ledger.py",
    "tests/multiprocess/test_options_ddp.py",
)
FSDP = ("tests/multiprocess/test_fsdp.py",)  # one 3-rank launch of every FSDP scenario
LM = ("tests/study/test_train_lm.py",)
PLACEMENT_UNIT = ("tests/unit/test_placement.py",)
HOP_CLOCK = ("tests/unit/test_hop_clock.py",)
PLACEMENTS_W3 = (
    "tests/multiprocess/test_placements.py",
    "-k",
    "3",
)  # the 3-rank launch: oracle, closed forms
CLOCK = ("tests/multiprocess/test_netclock.py", "-k", "not script and not summary")  # in-process and W=3 DDP
CLUSTER = ("tests/study/test_cluster.py",)  # the submitit-local sweeps (kill, preempt), SLURM stand-ins
GROUP = ("tests/multiprocess/test_group.py",)  # one 3-rank launch of every lossy-group scenario
CLUSTER_UNIT = ("tests/study/test_cluster.py", "-k", "slurm or requeued or scalars")  # no launch
STATUS_UNIT = ("tests/study/test_cluster.py", "-k", "status_of")  # --status of folders written by hand
LEDGER = ("tests/unit/test_ledger.py",)


def script(*names: str) -> tuple[str, ...]:
    return ("tests/study/test_train_ddp.py", "-k", " or ".join(names))


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    rule: str
    tests: tuple[tuple[str, ...], ...]


M = Mutant
MUTANTS = [
    # ---------------------------------------------------------------- the hook
    M(
        "M01",
        "lossy_hooks/core/techniques/fills.py",
        "    layout.fill_from_(stale, layout.finite_packets(out), out)\n",
        "    pass\n",
        "stale fill: the stale buffer takes every received finite packet",
        (HOOK,),
    ),
    M(
        "M02",
        "lossy_hooks/core/techniques/fills.py",
        "layout.fill_from_(stale, layout.finite_packets(out), out)",
        "layout.fill_from_(stale, torch.ones_like(layout.finite_packets(out)), out)",
        "stale fill: a non-finite packet never becomes the stale value",
        (HOOK,),
    ),
    M(
        "M03",
        "lossy_hooks/core/packetization.py",
        "        torch.where(lost[..., :n_full, None], src_full, full, out=full)\n",
        "        full.mul_((~lost[..., :n_full, None]).to(full.dtype))"
        ".addcmul_(src_full, lost[..., :n_full, None].to(full.dtype))\n",
        "stale fill selects: a received packet is never touched by a stale value (no inf*0)",
        (HOOK,),
    ),
    M(
        "M04",
        "lossy_hooks/core/techniques/fills.py",
        "pre = keep if pre is None else pre.mul_(keep)",
        "pre = keep if pre is None else pre",
        "drop_point='both' with a shared post mask applies the post mask",
        (HOOK,),
    ),
    M(
        "M05",
        "lossy_hooks/core/techniques/fills.py",
        "return None if post_lost is None else torch.where(post_lost, 0.0, post_factor)",
        "return None if post_lost is None else torch.where(post_lost, 0.0, 1.0)",
        "post rescale divides received packets by the kept fraction (independent masks too)",
        (HOOK,),
    ),
    M(
        "M06",
        "lossy_hooks/core/techniques/fills.py",
        "keep = self.post_keep(call.post_lost, call.post_factor)",
        "keep = self.post_keep(call.post_lost, 1.0 / self.config.post_keep_rate)",
        "post rescale for fixed-count models divides by (n - m)/n, not 1 - p",
        (HOOK,),
    ),
    M(
        "M07",
        "lossy_hooks/core/techniques/fills.py",
        "return torch.where(c > 0, world / c.clamp_min(1.0), 0.0)",
        "return torch.where(c > 0, 1.0 / c.clamp_min(1.0), 0.0)",
        "worker rescale is W/c_j times the arrived sum (sum reduction: W g_r when only r arrived)",
        (HOOK,),
    ),
    M(
        "M08",
        "lossy_hooks/core/techniques/fills.py",
        "unrecovered.add_((c == 0).sum())",
        "unrecovered.add_((c <= 1).sum())",
        "packets_unrecovered counts exactly the packets no copy reached",
        (HOOK,),
    ),
    M(
        "M09",
        "lossy_hooks/core/ledger.py",
        "math.sqrt(dd / yy) if yy > 0",
        "math.sqrt(dd / xx) if xx > 0",
        "fidelity rel_l2 = |x - y| / |y| with y the lossless aggregate",
        (HOOK,),
    ),
    M(
        "M10",
        "lossy_hooks/core/ledger.py",
        "dot / math.sqrt(xx * yy)",
        "dot / yy",
        "fidelity cosine = <x, y> / (|x| |y|)",
        (HOOK,),
    ),
    M(
        "M11",
        "lossy_hooks/core/techniques/fills.py",
        "    if pre is None:\n        if scale != 1.0:\n            buf.mul_(scale)",
        "    if pre is None:\n        if scale != 1.0:\n            buf.div_(round(1.0 / scale))",
        "1/W applied as DDP's multiply: bitwise DDP at loss 0 for any W",
        (
            HOOK,
            UNIT,
        ),
    ),
    M(
        "M12",
        "lossy_hooks/core/techniques/fills.py",
        "return dtype == torch.float32 or math.frexp(value)[0] == 0.5",
        "return True",
        "1/W is never folded into a half-precision factor (no bf16-rounded 1/3)",
        (UNIT,),
    ),
    M(
        "M13",
        "lossy_hooks/core/techniques/fills.py",
        "    for peer, draw in peers:\n",
        "    for peer, draw in []:\n",
        "regenerate counts replay every other rank's mask",
        (HOOK,),
    ),
    M(
        "M14",
        "lossy_hooks/core/streams.py",
        "gen.manual_seed(derive_seed(seed, self.stream, stream_rank))",
        "gen.manual_seed(derive_seed(seed, self.stream, 0))",
        "worker masks are drawn per rank from (seed, rank)",
        (HOOK,),
    ),
    M(
        "M15",
        "lossy_hooks/core/streams.py",
        "per_rank=not shared)",
        "per_rank=True)",
        "post_sync='shared' draws one mask for every rank",
        (HOOK,),
    ),
    M(
        "M16",
        "lossy_hooks/core/buckets.py",
        "ids = (buf.numel(), *map(id, params))",
        "ids = (buf.numel(),)",
        "per-bucket state is keyed on the bucket's contents (rebuilt buckets)",
        (HOOK,),
    ),
    M(
        "M17",
        "lossy_hooks/core/streams.py",
        "            self.model.start_stream(derive_seed(seed, self.stream + START_OFFSET, stream_rank))\n",
        "            pass\n",
        "a trace starts at an offset of each stream's own",
        (HOOK,),
    ),
    M(
        "M18",
        "lossy_hooks/core/pipeline/allreduce.py",
        "    if ends_step:\n        state.steps += 1",
        "    if True:\n        state.steps += 1",
        "steps count optimizer steps, not buckets",
        (HOOK,),
    ),
    M(
        "M19",
        "lossy_hooks/core/counters.py",
        "per_packet.add_(lost.sum(0, dtype=torch.int32) if lost.dim() > 1 else lost)",
        "per_packet.add_(lost.sum(0, dtype=torch.int32) if lost.dim() > 1 else ~lost)",
        "packets_lost counts the lost packets",
        (HOOK,),
    ),
    M(
        "M20",
        "lossy_hooks/core/ledger.py",
        "        if all_ranks:\n            self._sum_over_ranks(vec)\n        values",
        "        if all_ranks:\n            pass\n        values",
        "stats(all_ranks=True) sums over the group",
        (HOOK,),
    ),
    M(
        "M21",
        "lossy_hooks/core/techniques/hadamard.py",
        "return start // packet_numel, min((stop - 1) // packet_numel, num_packets - 1)",
        "return start // packet_numel, min(stop // packet_numel, num_packets - 1)",
        "loss_by_parameter: a parameter is carried by packets s//k .. (e-1)//k",
        (HOOK,),
    ),
    M(
        "M22",
        "lossy_hooks/core/options.py",
        "    if world > limit:\n",
        "    if False:\n",
        "append counts are refused where the dtype cannot count the ranks",
        (HOOK,),
    ),
    # ---------------------------------------------------------------- loss models
    M(
        "M23",
        "lossy_hooks/loss_models/markov.py",
        "        self.loss_from_previous_state = True\n",
        "",
        "Gilbert-Elliott decides loss in the state the packet arrived in (netem)",
        (UNIT,),
    ),
    M(
        "M24",
        "lossy_hooks/loss_models/memoryless.py",
        "m = math.floor(self.p * num_packets + _COUNT_EPS)",
        "m = math.ceil(self.p * num_packets - _COUNT_EPS)",
        "ExactCount loses floor(p n)",
        (UNIT,),
    ),
    M(
        "M25",
        "lossy_hooks/loss_models/memoryless.py",
        ">= (num_packets - m)",
        "< m",
        "TailDrop loses the last ceil(p n)",
        (
            UNIT,
            HOOK,
        ),
    ),
    M(
        "M26",
        "lossy_hooks/loss_models/memoryless.py",
        "        return (num_packets - math.floor(self.p * num_packets + _COUNT_EPS)) / num_packets",
        "        return 1.0 - self.p",
        "ExactCount's kept fraction is (n - m)/n",
        (UNIT,),
    ),
    M(
        "M27",
        "lossy_hooks/loss_models/memoryless.py",
        "        return u < self.p\n",
        "        return u > self.p\n",
        "Bernoulli loses with probability p",
        (UNIT,),
    ),
    M(
        "M28",
        "lossy_hooks/loss_models/markov.py",
        "            absorb = float(a[np.flatnonzero(transient == start)[0]])\n",
        "            absorb = 1.0\n",
        "long-run rate: closed classes weighed by their absorption probability from the start",
        (UNIT,),
    ),
    M(
        "M29",
        "lossy_hooks/loss_models/markov.py",
        "[self.p31, self.p32, 1 - self.p31 - self.p32, 0.0]",
        "[self.p32, self.p31, 1 - self.p31 - self.p32, 0.0]",
        "four-state transitions from state 3",
        (UNIT,),
    ),
    M(
        "M30",
        "lossy_hooks/loss_models/memoryless.py",
        "        self.position = seed % self._trace.numel()\n",
        "        self.position = 0\n",
        "trace offsets differ per stream",
        (
            UNIT,
            HOOK,
        ),
    ),
    M(
        "M31",
        "lossy_hooks/loss_models/markov.py",
        "        out[c] += absorb * np.clip(pi_c, 0.0, None)\n",
        "        out[c] += absorb * np.ones(len(c)) / len(c)\n",
        "a closed class's stationary law",
        (UNIT,),
    ),
    M(
        "M32",
        "lossy_hooks/loss_models/netem.py",
        "    value = float(text) / 100.0",
        "    value = float(text) / 10.0",
        "netem numbers are percentages",
        (UNIT,),
    ),
    # ---------------------------------------------------------------- packetization
    M(
        "M33",
        "lossy_hooks/core/packetization.py",
        "            tail.mul_(factor[..., n_full:])",
        "            tail.mul_(factor[..., n_full - 1 : n_full])",
        "the short last packet has its own mask and factor",
        (HOOK,),
    ),
    M(
        "M34",
        "lossy_hooks/core/packetization.py",
        "    return mtu // element_size",
        "    return mtu // element_size + 1",
        "a packet holds mtu // element_size elements",
        (
            UNIT,
            HOOK,
        ),
    ),
    M(
        "M35",
        "lossy_hooks/core/packetization.py",
        "        per_packet = full.all(-1)",
        "        per_packet = full.any(-1)",
        "a packet is finite only if all its elements are",
        (
            UNIT,
            HOOK,
        ),
    ),
    # ---------------------------------------------------------------- the study script
    M(
        "M36",
        "lossy_hooks/study/cli.py",
        'reduction = "mean" if args.use_avg else "sum"',
        'reduction = "mean"',
        "without --use_avg contributions are summed",
        (script("reach_the_hook", "sum_reduction"),),
    ),
    M(
        "M37",
        "lossy_hooks/study/cli.py",
        'fill = args.fill or ("zero" if args.use_zero else "rescale")',
        'fill = args.fill or "rescale"',
        "--use_zero means zero fill",
        (script("reach_the_hook"),),
    ),
    M(
        "M38",
        "lossy_hooks/study/rounds.py",
        'self.seed = cfg["seed"] + k',
        'self.seed = cfg["seed"]',
        "round k uses seed + k",
        (script("torchrun_folder"),),
    ),
    M(
        "M39",
        "lossy_hooks/study/rounds.py",
        "self.scaler.scale(objective / group_size).backward()",
        "self.scaler.scale(objective / acc_steps).backward()",
        "a short group steps with its mean",
        (script("partial_accumulation"),),
    ),
    M(
        "M40",
        "lossy_hooks/study/rounds.py",
        "                    (self.dir / log).unlink(missing_ok=True)\n",
        "                    pass\n",
        "a round with no checkpoint starts over with empty logs",
        (script("kill_before"),),
    ),
    M(
        "M41",
        "lossy_hooks/study/rounds.py",
        'overflow = cfg["amp"] and self.scaler.get_scale() < scale_before',
        "overflow = False",
        "AMP skipped steps are counted and kept out of the averages",
        (script("amp_overflow"),),
    ),
    M(
        "M42",
        "lossy_hooks/study/run_control.py",
        "    if owner is None:\n        return None\n",
        "    if True:\n        return None\n",
        "one writer per configuration",
        (script("refused_while"),),
    ),
    M(
        "M43",
        "lossy_hooks/study/run_io.py",
        "                sent, lost = sent + s, lost + lo",
        "                sent, lost = s, lo",
        "summary and compare report the whole round's loss rate",
        (RUN_IO,),
    ),
    M(
        "M44",
        "lossy_hooks/study/replicas.py",
        "    if optimizer is None:\n        return\n",
        "    if optimizer is not None:\n        return\n",
        "resync broadcasts the optimizer state too",
        (HOOK,),
    ),
    M(
        "M47",
        "lossy_hooks/core/ledger.py",
        "prev, self.mark = self.mark, now",
        "prev, self.mark = {}, now",
        "per-epoch rows count the epoch's packets (deltas since the mark), also after a resume",
        (("tests/unit/test_ledger.py",), script("resume")),
    ),
    # ---------------------------------------------------------------- encodings and protection
    M(
        "M48",
        "lossy_hooks/core/techniques/retransmit.py",
        "lost = lost & draw(n)",
        "lost = draw(n)",
        "a retransmission can only recover a packet, never lose one that arrived",
        (OPTIONS,),
    ),
    M(
        "M49",
        "lossy_hooks/core/techniques/fec.py",
        "(groups.sum(1, keepdim=True) > r)",
        "(groups.sum(1, keepdim=True) >= r)",
        "an FEC group with at most r losses loses nothing",
        (OPTIONS,),
    ),
    M(
        "M50",
        "lossy_hooks/core/techniques/hadamard.py",
        "    _flip_signs_(x, words.view(1, -1), scratch if x is y else y)  # D (Q y)\n",
        "",
        "the decoder undoes the random signs (x = D Q y)",
        (OPTIONS,),
    ),
    M(
        "M51",
        "lossy_hooks/core/techniques/error_feedback.py",
        "record.layout.fill_from_(record.residual, lost & record.layout.finite_packets(buf), buf)",
        "record.layout.fill_from_(record.residual, ~lost & record.layout.finite_packets(buf), buf)",
        "error feedback keeps what was lost, not what arrived",
        (OPTIONS,),
    ),
    M(
        "M52",
        "lossy_hooks/core/techniques/protect.py",
        "lost = lost & ~protected",
        "lost = lost",
        "protected packets are never lost",
        (OPTIONS,),
    ),
    M(
        "M53",
        "lossy_hooks/core/ledger.py",
        "sent_bytes += row[0] * entry.wire_bytes // entry.packets",
        "sent_bytes += row[0] * entry.wire_bytes",
        "bytes_sent counts each call's wire bytes once",
        (OPTIONS,),
    ),
    M(
        "M54",
        "lossy_hooks/core/streams.py",
        '            "rotation": self.rotation.state_dict(),\n',
        "",
        "a resumed Hadamard run continues the same sign stream",
        (script("resume_is_exact"),),
    ),
    M(
        "M55",
        "lossy_hooks/core/buckets.py",
        '            "residual": {key_str(k): v.detach().cpu() for k, v in residual.items()},\n',
        "",
        "error-feedback residuals are checkpointed",
        (script("resume_is_exact"),),
    ),
    # ---------------------------------------------------------------- FSDP and the language model
    M(
        "M56",
        "lossy_hooks/core/techniques/fills.py",
        "    own = torch.zeros((1, net.shape[1]), dtype=net.dtype, device=net.device)",
        "    own = torch.ones((1, net.shape[1]), dtype=net.dtype, device=net.device)",
        "a rank's own row never crosses the network, so it is never lost",
        (FSDP,),
    ),
    M(
        "M57",
        "lossy_hooks/core/techniques/fills.py",
        "state.peer_draws(call.record), shard_rows=call.rows > 1)",
        "state.peer_draws(call.record), shard_rows=False)",
        "worker rescale divides by the arrivals of each shard row, not of a column",
        (FSDP,),
    ),
    M(
        "M58",
        "lossy_hooks/core/pipeline/sharded.py",
        "            record.stale = rows.clone()  # every rank built the whole model before sharding it",
        "            record.stale = torch.zeros_like(rows)",
        "the all-gather's stale copy starts as the first gather's values",
        (FSDP,),
    ),
    M(
        "M59",
        "lossy_hooks/core/pipeline/sharded.py",
        "            op = dist.ReduceOp.SUM\n",
        "",
        "reduction='sum' turns FSDP's average into a sum",
        (FSDP,),
    ),
    M(
        "M60",
        "lossy_hooks/core/pipeline/sharded.py",
        "        self.state.ledger.count(site.name, record.key, (world - 1) * n, net)",
        "        self.state.ledger.count(site.name, record.key, world * n, net)",
        "packets counted as sent are the (W-1) n that cross the network",
        (FSDP,),
    ),
    M(
        "M61",
        "lossy_hooks/study/workloads/text_data.py",
        '        train = b"\\n".join(p for i, p in enumerate(parts) if i % VAL_EVERY != VAL_EVERY - 1)',
        '        train = b"\\n".join(parts)',
        "validation files are kept out of training",
        (("tests/study/test_train_lm.py", "-k", "corpus"),),
    ),
    M(
        "M62",
        "lossy_hooks/study/checkpoints.py",
        '        runner.gather.load_state_dict(mine["gather"])',
        "        pass",
        "a resumed FSDP run continues the all-gather's loss sequence",
        (("tests/study/test_train_lm.py", "-k", "resumes_exactly"),),
    ),
    M(
        "M63",
        "lossy_hooks/study/parallel.py",
        "        model.set_requires_gradient_sync(False)",
        "        pass",
        "under FSDP non-final micro-batches accumulate locally: one reduce-scatter per step",
        (("tests/study/test_train_lm.py", "-k", "resumes_exactly or same_model"),),
    ),
    M(
        "M64",
        "lossy_hooks/core/pipeline/sharded.py",
        "        self.state.ledger.count(site.name, record.key, (world - 1) * n, net)",
        "        self.state.ledger.count(site.name, record.key, (world - 1) * n, net)\n"
        "        _ = None if lost is None else lost.any().item()",
        "the FSDP collectives never wait for the device (no host sync)",
        (FSDP,),
    ),
    # ---------------------------------------------------------------- simulated time
    M(
        "M65",
        "lossy_hooks/core/network.py",
        "        return 2 * (world - 1) * (self.alpha + nbytes / (world * self.beta))",
        "        return 2 * world * (self.alpha + nbytes / (world * self.beta))",
        "the loss-free ring takes 2(W-1) steps of B/W bytes",
        (CLOCK,),
    ),
    M(
        "M66",
        "lossy_hooks/core/network.py",
        "    return torch.where(hold, d.reshape(-1) if d.dim() else d, close)",
        "    return close",
        "the deadline transport stops at the deadline when a delivered packet is late",
        (CLOCK,),
    ),
    M(
        "M67",
        "lossy_hooks/core/netclock.py",
        "        reliable = t.max() if tries is None else (t + tries * resend).max()",
        "        reliable = t.max() if tries is None else (t + (tries > 0) * resend).max()",
        "a packet dropped K times costs K timeouts and resends",
        (CLOCK,),
    ),
    M(
        "M68",
        "lossy_hooks/core/netclock.py",
        "        return torch.where(slow, net.straggler_factor, 1.0).double()",
        "        return torch.where(slow, 1.0, 1.0).double()",
        "a straggler's packets take f times the loss-free time",
        (CLOCK,),
    ),
    M(
        "M69",
        "lossy_hooks/core/netclock.py",
        "                gen.set_state(state)",
        "                pass",
        "a resumed clock continues its random stream",
        (CLOCK,),
    ),
    M(
        "M70",
        "lossy_hooks/core/streams.py",
        "*((s, r) for r, s in self.peers.items())",
        "*((s, rank) for r, s in self.peers.items())",
        "regenerated counts replay each peer's own row of the clock",
        (CLOCK,),
    ),
    # ---------------------------------------------------------------- issue 28's four, and two more
    M(
        "M71",
        "lossy_hooks/core/techniques/fills.py",
        "        return rescale if factor is None else factor.mul_(rescale)",
        "        return rescale",
        "both + independent post + rescale with summed counts: W/c_j and the post factor multiply",
        (HOOK,),
    ),
    M(
        "M72",
        "lossy_hooks/core/buckets.py",
        "key = max(saved) if saved",
        "key = min(saved) if saved",
        "on resume a bucket takes over the saved key of the most recent generation",
        (HOOK,),
    ),
    M(
        "M73",
        "lossy_hooks/core/pipeline/sharded.py",
        "drawn.view(world, n)[rank] if not site.per_rank",
        "drawn.view(world, n)[0] if not site.per_rank",
        "FSDP shared post mask: rank r keeps row r of the one draw",
        (FSDP,),
    ),
    M(
        "M74",
        "lossy_hooks/core/techniques/hadamard.py",
        "words.view(-1, 2)[:, 1]",
        "words.view(-1, 2)[:, 0]",
        "Hadamard signs of an fp64 bucket flip the sign bit (the high word)",
        (OPTIONS,),
    ),
    M(
        "M75",
        "lossy_hooks/core/techniques/hadamard.py",
        "DEFAULT_HADAMARD_BLOCK = 1 << 18",
        "DEFAULT_HADAMARD_BLOCK = 4096",
        "the default Hadamard block spreads bursts of 4 packets (error <= 0.5x plain)",
        (OPTIONS,),
    ),
    M(
        "M76",
        "lossy_hooks/core/buckets.py",
        "factor = post_rescale_factor(self.post.model, post_rows * n, post_rows * wire_bytes)",
        "factor = post_rescale_factor(self.post.model, post_rows * n, post_rows * n * settings.mtu)",
        "the deadline post rescale prices the bucket's real bytes (a short last packet)",
        (CLOCK,),
    ),
    M(
        "M77",
        "lossy_hooks/core/techniques/hadamard.py",
        "the other stage parity: one copy\n                home[:, start:end].copy_(done.view(rows, -1))\n",
        "the other stage parity: one copy\n                pass\n",
        "a tail block whose transform has the other stage parity is copied into the result",
        (OPTIONS,),
    ),
    M(
        "M78",
        "lossy_hooks/core/placement/ring.py",
        '"reduce": (np.where(owner, c, (r + 1) % world), (r - c - 1) % world),',
        '"reduce": (np.where(owner, c, (r + 1) % world), (c - r - 1) % world),',
        "at reduce-scatter step s rank r sends chunk (r - s - 1) mod W",
        (PLACEMENT_UNIT, PLACEMENTS_W3),
    ),
    M(
        "M79",
        "lossy_hooks/core/placement/schedule.py",
        "for _ in range(math.ceil(math.log2(depth)) if depth > 1 else 0):",
        "for _ in range(math.floor(math.log2(depth)) if depth > 1 else 0):",
        "pointer doubling takes ceil(log2 depth) rounds to cover every path",
        (PLACEMENT_UNIT,),
    ),
    M(
        "M80",
        "lossy_hooks/core/placement/hop_loss.py",
        "out.post_lost = mine",
        "out.post_lost = alive[:, 0].reshape(-1)[slot].logical_not_()",
        "a rank's broadcast mask is its own path's, not the root's",
        (PLACEMENTS_W3,),
    ),
    M(
        "M81",
        "lossy_hooks/core/placement/timing.py",
        "share = np.maximum(out[level, src], inn[level, dst])",
        "share = np.ones_like(src)",
        "the flows of a step share their ports (incast at a direct exchange's owner)",
        (HOP_CLOCK,),
    ),
    M(
        "M82",
        "lossy_hooks/core/netclock.py",
        "cut = x * tm.step_lossfree  # d_t",
        "cut = x * tm.step_lossfree.sum() + 0 * tm.step_lossfree  # d_t",
        "each step's deadline is x times its own loss-free time",
        (HOP_CLOCK,),
    ),
    M(
        "M83",
        "lossy_hooks/loss_models/deadline.py",
        "x = torch.quantile(history[:, :-1].mean(0), 0.5)",
        "x = history[:, :-1].mean()",
        "the adaptive deadline is the median over ranks of each rank's mean ratio",
        (HOP_CLOCK,),
    ),
    M(
        "M84",
        "lossy_hooks/core/placement/schedule.py",
        "    if not towards_root:\n        return depth - 1",
        "    if True:\n        return depth - 1",
        "towards the root a rank sends at its height (after all its children)",
        (HOP_CLOCK,),
    ),
    M(
        "M85",
        "lossy_hooks/core/techniques/fills.py",
        "pre.mul_(arrival_factor(call.arrivals, call.world, unrecovered))",
        "pre.mul_(arrival_factor(call.arrivals * 0 + call.world, call.world, unrecovered))",
        "a per-hop reduce (DDP's, FSDP's reduce-scatter) rescales by W / c of the hops' arrivals",
        (PLACEMENTS_W3,),
    ),
    M(
        "M86",
        "lossy_hooks/core/network.py",
        "        hold |= dropped.gather(1, last)[:, 0] & valid.any(1)",
        "        hold |= dropped.any(1) & valid.any(1)",
        "early close: only a dropped last (flagged) packet holds the step to its deadline",
        (HOP_CLOCK,),
    ),
    M(
        "M45",
        "lossy_hooks/study/rounds.py",
        "            group_size = min(acc_steps, n_batches - group_start)",
        "            group_size = acc_steps",
        "the last group of an epoch closes at the epoch's end",
        (script("partial_accumulation"),),
    ),
    M(
        "M46",
        "lossy_hooks/tools/compare.py",
        '"loss_rate_measured": run_loss_rate(rows)',
        '"loss_rate_measured": _f(rows[-1]["effective_loss_rate"]) if rows else math.nan',
        "compare's measured loss rate is the whole round's",
        (RUN_IO,),
    ),
    # ---------------------------------------------------------------- sweeps as jobs, TensorBoard
    M(
        "M87",
        "lossy_hooks/study/tensorboard_log.py",
        "SummaryWriter(str(log_dir), purge_step=first_epoch)",
        "SummaryWriter(str(log_dir), purge_step=None)",
        "a resumed round's TensorBoard run drops what the killed process wrote from its first epoch on",
        (CLUSTER,),
    ),
    M(
        "M88",
        "lossy_hooks/study/run_control.py",
        'if not same_host and job is not None and owner.get("job") == job:',
        'if not same_host and job is not None and owner.get("job") != job:',
        "a requeued job takes over only the lock its own earlier incarnation left",
        (CLUSTER_UNIT,),
    ),
    M(
        "M89",
        "lossy_hooks/study/sweeping/planning.py",
        '_BUSY_STATES = ("running", "pending", "unknown")',
        '_BUSY_STATES = ("pending", "unknown")',
        "a configuration a live job writes is not submitted again",
        (CLUSTER_UNIT,),
    ),
    M(
        "M90",
        "lossy_hooks/study/sweeping/jobs.py",
        "        return submitit.helpers.DelayedSubmission(TrainJob(self.argv))",
        "        return None",
        "submitit's checkpoint hook requeues the same run",
        (CLUSTER_UNIT,),
    ),
    M(
        "M91",
        "lossy_hooks/study/sweeping/jobs.py",
        'self.argv = list(argv) if "--resume" in argv else [*argv, "--resume"]',
        "self.argv = list(argv)",
        "a job always runs with --resume: a resubmitted or requeued run continues",
        (CLUSTER_UNIT,),
    ),
    M(
        "M92",
        "lossy_hooks/study/sweeping/planning.py",
        "                (run_dir / LOCK_NAME).unlink(missing_ok=True)",
        "                pass",
        "a lock left on another node by a job the scheduler says has ended is removed before resubmitting",
        (CLUSTER_UNIT,),
    ),
    M(
        "M93",
        "lossy_hooks/study/tensorboard_log.py",
        'out[f"loss_rate/{point}"] = lost / sent',
        'out[f"loss_rate/{point}"] = lost / (sent + lost)',
        "TensorBoard's loss rate per drop point: lost over sent in the epoch",
        (CLUSTER_UNIT,),
    ),
    # ---------------------------------------------------------------- issue 41: rules no test pinned
    M(
        "M94",
        "lossy_hooks/core/ledger.py",
        "calls = self.sent[p].get(k, 0) // max(entry.packets, 1) * world",
        "calls = self.sent[p].get(k, 0) // max(entry.packets, 1)",
        "a parameter's packets sent are summed over the ranks (all_ranks) as its lost ones are",
        (LEDGER,),
    ),
    M(
        "M95",
        "lossy_hooks/core/placement/tree.py",
        "rank_at = (np.arange(world) + 1) % world if world % 2 == 0 else world - 1 - np.arange(world)",
        "rank_at = (np.arange(world) + 1) % world",
        "the double tree's second tree is the first mirrored at odd W (NCCL 2.5.6-2.7.8's ncclGetDtree)",
        (PLACEMENT_UNIT, PLACEMENTS_W3),
    ),
    M(
        "M96",
        "lossy_hooks/core/placement/hop_loss.py",
        "gen.manual_seed(derive_seed(seed, hop_stream(phase), 0))",
        'gen.manual_seed(derive_seed(seed, hop_stream("reduce"), 0))',
        "drop_point='both': the reduce and broadcast hops lose independently (own streams)",
        (PLACEMENT_UNIT,),
    ),
    M(
        "M97",
        "lossy_hooks/core/placement/hop_loss.py",
        "per_hop = np.repeat([m.keep_fraction(steps * slots) for m in streams.models], steps)",
        "per_hop = np.tile([m.keep_fraction(steps * slots) for m in streams.models], steps)",
        "a path's keep fraction q (the broadcast rescale's 1/q) is its own links' keep fractions' product",
        (PLACEMENT_UNIT,),
    ),
    M(
        "M98",
        "lossy_hooks/study/sweeping/config_state.py",
        "    if all(ended):\n",
        "    if any(ended):\n",
        "a configuration is done only when every round ended",
        (STATUS_UNIT,),
    ),
    # ---------------------------------------------------------------- the lossy process group
    M(
        "M99",
        "lossy_hooks/core/pipeline/delivery.py",
        "if m and sender != rank and (node is None",
        "if m and (node is None",
        "a rank's own chunk never crosses the network, so it is never lost",
        (GROUP,),
    ),
    M(
        "M100",
        "lossy_hooks/core/pipeline/delivery.py",
        "(node is None or sender // node != rank // node)",
        "(True)",
        "with ranks_per_node, a chunk from a rank of the same node is never lost",
        (GROUP,),
    ),
    M(
        "M101",
        "lossy_hooks/group.py",
        "    return bool(op == dist.ReduceOp.SUM or op == dist.ReduceOp.AVG)",
        "    return True",
        "only SUM and AVG reductions lose: a MAX is control traffic",
        (GROUP,),
    ),
    M(
        "M102",
        "lossy_hooks/group.py",
        "    return t.is_floating_point() or t.is_complex()",
        "    return True",
        "integer tensors (object collectives, sizes, indices) never lose",
        (GROUP,),
    ),
    M(
        "M103",
        "lossy_hooks/group.py",
        "            and not reliable_now()\n",
        "",
        "inside reliable() a lossy group loses nothing",
        (GROUP,),
    ),
    M(
        "M104",
        "lossy_hooks/core/counters.py",
        "        total.add_(lost.sum())",
        "        total.add_(0)",
        "stats()['collectives'] counts the packets each kind lost",
        (GROUP,),
    ),
    M(
        "M105",
        "lossy_hooks/core/pipeline/delivery.py",
        "        site = self.sites[kind]",
        "        site = state.worker",
        "each delivered kind draws from a stream of its own: other traffic never shifts its losses",
        (GROUP,),
    ),
    M(
        "M106",
        "lossy_hooks/group.py",
        "        scale = 1.0 / self.size() if opts.reduceOp == dist.ReduceOp.AVG else 1.0",
        "        scale = 1.0",
        "an AVG all-reduce through the group is the mean",
        (GROUP,),
    ),
    M(
        "M107",
        "lossy_hooks/hook.py",
        '    if "all_reduce" in lossy_kinds(group):',
        "    if False:",
        "the DDP hook refuses a group that already loses all-reduces (the loss would apply twice)",
        (GROUP,),
    ),
    M(
        "M108",
        "lossy_hooks/core/pipeline/sharded.py",
        "        if site.lossless or not state.protecting:\n            return site.draw(rows * n)",
        "        if True:\n            return site.draw(rows * n)",
        "under FSDP a lost packet is resent (retransmit): it stays lost with p^(k+1)",
        (FSDP,),
    ),
    M(
        "M109",
        "lossy_hooks/core/techniques/error_feedback.py",
        "            feed_back_(call.record, x, call.lost)",
        "            pass",
        "under FSDP error feedback resends what each rank's rows lost: every gradient arrives, late",
        (FSDP,),
    ),
    M(
        "M110",
        "lossy_hooks/core/buckets.py",
        "        record.residual = self.saved_residual.pop(key, None)\n",
        "        record.residual = None\n",
        "an FSDP unit's error-feedback residuals survive a resume",
        (FSDP,),
    ),
    M(
        "M111",
        "lossy_hooks/core/techniques/hadamard.py",
        "call.memo[self.name] = signs if call.rows == 1 else signs[call.row]",
        "call.memo[self.name] = signs if call.rows == 1 else signs[0]",
        "a reduce-scatter's row is decoded with the signs of that row (each row rotated on its own)",
        (FSDP,),
    ),
    M(
        "M112",
        "lossy_hooks/core/ledger.py",
        "            self._sum_over_ranks(sums)\n",
        "            pass\n",
        "fidelity over all ranks sums the four sums over the group (the whole reduced vector)",
        (FSDP,),
    ),
    M(
        "M113",
        "lossy_hooks/study/workloads/gpt.py",
        "view(3, tp, -1, cfg.n_embd).transpose(0, 1).reshape(-1, cfg.n_embd)",
        "view(3, tp, -1, cfg.n_embd).reshape(-1, cfg.n_embd)",
        "tensor parallelism reorders qkv's rows so that a column shard holds whole q, k and v heads",
        (GROUP,),
    ),
    M(
        "M114",
        "lossy_hooks/study/rounds.py",
        "DistributedSampler(data.train, self.dp, self.dp_rank, shuffle=True, seed=self.seed)",
        "DistributedSampler(data.train, self.world, self.rank, shuffle=True, seed=self.seed)",
        "the tensor-parallel ranks of one data-parallel replica train on the same batches",
        (("tests/study/test_train_parallel.py", "-k", "lossless"),),
    ),
    M(
        "M115",
        "lossy_hooks/study/workloads/moe.py",
        "    return math.ceil(factor * top_k * tokens / n_expert)",
        "    return math.floor(factor * top_k * tokens / n_expert)",
        "an expert takes ceil(C k N / E) token-slots per forward",
        (("tests/unit/test_moe.py",),),
    ),
    M(
        "M116",
        "lossy_hooks/study/workloads/gpt.py",
        "        bounds = [k * (n // stages) + min(k, n % stages) for k in range(stages + 1)]",
        "        bounds = [k * (n // stages) for k in range(stages)] + [n]",
        "pipeline stages split the blocks evenly, the first L mod stages one more",
        (("tests/unit/test_gpt_parallel.py",),),
    ),
    M(
        "M117",
        "lossy_hooks/study/parallel.py",
        "    torch._foreach_mul_(grads, scale)",
        "    pass",
        "the experts' gradients under --ep are DDP's mean: summed over their replicas, times 1/W",
        (("tests/study/test_train_parallel.py", "-k", "lossless_pp_and_ep"),),
    ),
    M(
        "M118",
        "lossy_hooks/study/parallel.py",
        "        dist.all_reduce(flat, group=replica_group)",
        "        pass",
        "the experts' gradients are summed over the ranks holding the same experts",
        (("tests/study/test_train_parallel.py", "-k", "expert_replicas"),),
    ),
    M(
        "M119",
        "lossy_hooks/study/workloads/gpt.py",
        "PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(whole,))",
        "PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(whole,), use_local_output=True)",
        "sequence parallelism: the attention's gather has a reduce-scatter as its backward (Megatron)",
        (("tests/multiprocess/test_group.py", "-k", "sequence_parallel"),),
    ),
    M(
        "M120",
        "lossy_hooks/study/workloads/gpt.py",
        "        return grad, torch.ones(shape, dtype=dtype, device=device)",
        "        return grad, torch.zeros(shape, dtype=dtype, device=device)",
        "a pipeline stage's load-balancing loss joins the micro-batch's backward (gradient 1)",
        (("tests/study/test_train_parallel.py", "-k", "composed"),),
    ),
    M(
        "M121",
        "lossy_hooks/study/checkpoints.py",
        "            runner.module.reshard()  # save): the next forward gathers, as after a resume",
        "            pass",
        "an FSDP stage is resharded at each per-rank checkpoint, as a resumed run starts",
        (("tests/study/test_train_parallel.py", "-k", "resumes_exactly and fsdp-pp"),),
    ),
    M(
        "M122",
        "lossy_hooks/study/parallel.py",
        "DTensor.from_local(placed, p.device_mesh, p.placements, **spec)",
        "placed",
        "a resumed FSDP rank's optimizer state is DTensors of its parameters' mesh and placements",
        (("tests/study/test_train_parallel.py", "-k", "resumes_exactly and fsdp"),),
    ),
]


def copy_tree(dest: Path) -> None:
    """The tracked files and new unignored ones (what CI's clone would hold, plus work in progress)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for rel in listed:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_mutant(tree: Path, m: Mutant, env: dict[str, str], timeout: float) -> tuple[str, float, str]:
    path = tree / m.file
    original = path.read_text()
    if original.count(m.old) != 1:
        return "stale", 0.0, f"{m.file}: the text to mutate occurs {original.count(m.old)} times"
    path.write_text(original.replace(m.old, m.new))
    t0 = time.time()
    try:
        lines = []
        for selection in m.tests:  # cheapest first; the first failing selection kills it
            res = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection],
                cwd=tree,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if res.returncode == 5:
                return "error", time.time() - t0, f"no tests selected by {selection}"
            lines.append((res.stdout.strip().splitlines() or [""])[-1])
            if res.returncode:
                return "killed", time.time() - t0, lines[-1]
        return "survived", time.time() - t0, "; ".join(lines)
    except subprocess.TimeoutExpired:
        return "killed (timeout)", time.time() - t0, f"over {timeout:.0f} s"
    finally:
        path.write_text(original)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the curated mutants against the tests that own their rules.")
    p.add_argument("--only", nargs="*", default=None, help="mutant ids to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutant (> 0)")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only is None or m.id in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.id}  {m.file:<28} {m.rule}")
        return 0
    if not chosen:
        p.error(f"--only: no such mutant among {[m.id for m in MUTANTS]}")
    results = []
    with tempfile.TemporaryDirectory(prefix="lossy_mutants_") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
        where = subprocess.run(
            [sys.executable, "-c", "import lossy_hooks; print(lossy_hooks.__file__)"],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if not where.startswith(str(tree)):
            raise SystemExit(
                f"the copy's package is not the one imported ({where}); mutants would test nothing"
            )
        for i, m in enumerate(chosen):
            outcome, seconds, detail = run_mutant(tree, m, env, args.timeout)
            results.append(
                {
                    "id": m.id,
                    "file": m.file,
                    "rule": m.rule,
                    "outcome": outcome,
                    "seconds": round(seconds, 1),
                    "detail": detail,
                }
            )
            print(f"[{i + 1}/{len(chosen)}] {m.id} {outcome:<9} {seconds:6.1f} s  {m.rule}", flush=True)
    killed = sum(r["outcome"].startswith("killed") for r in results)
    score = killed / len(results)
    print(f"score: {killed}/{len(results)} killed = {100 * score:.1f}%")
    for r in results:
        if not r["outcome"].startswith("killed"):
            print(f"  {r['outcome']}: {r['id']} {r['file']}: {r['rule']} ({r['detail']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"score": score, "results": results}, indent=2))
    return 0 if score >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())

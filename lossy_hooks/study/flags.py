"""The study script's flags: ``build_parser()`` (every flag's name, default, unit and range in
its help). Their checks, and how they become the run configuration and the hook's settings,
are in :mod:`lossy_hooks.study.cli`.
"""

from __future__ import annotations

import argparse

from lossy_hooks.core.options import (
    ALGORITHMS,
    AUTO_REGENERATE_MAX_WORLD,
    COUNTS_TRANSPORTS,
    DROP_POINTS,
    FILLS,
    OPTION_DEFAULTS,
    PACKETIZATIONS,
    POST_SYNCS,
)
from lossy_hooks.core.techniques.hadamard import ENCODINGS
from lossy_hooks.core.techniques.wire_dtype import WIRE_DTYPES
from lossy_hooks.loss_models import LOSS_MODEL_SYNTAX
from lossy_hooks.study.parallel import STRATEGIES
from lossy_hooks.study.run_names import NETWORK_DEFAULTS
from lossy_hooks.study.workloads.data import DATASETS, IMAGENETTE_SIZES
from lossy_hooks.study.workloads.gpt import GPT_CONFIGS

__all__ = ["OPTIMIZERS", "build_parser"]

OPTIMIZERS = ("sgd", "adamw")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` except where the default is None: those flags say in their
    own text what happens when they are not given."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a torchvision model or a small GPT with DDP or FSDP2 under simulated packet loss.",
        formatter_class=_HelpFormatter,
    )
    _add_original_flags(p)
    beyond = p.add_argument_group("beyond the original")
    _add_loss_and_model_flags(beyond)
    _add_data_and_run_flags(beyond)
    _add_run_folder_flags(beyond)
    _add_placement_flags(p)
    _add_technique_flags(p)
    _add_network_flags(p)
    return p


def _add_placement_flags(p: argparse.ArgumentParser) -> None:
    """Where a collective loses packets: the algorithm, per hop (core/placement)."""
    h = p.add_argument_group("where packets are lost: per hop of the collective (docs/semantics.md)")
    h.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        default=OPTION_DEFAULTS["algorithm"],
        help="ps: one uplink before and one downlink after an opaque allreduce; ring / tree / dbtree / "
        "direct: --loss_rate per link transmission of NCCL's ring, its (double) binary tree, or a "
        "transpose exchange (worker = the reduce phase's hops, post = the broadcast phase's)",
    )
    h.add_argument(
        "--ranks_per_node",
        type=int,
        default=None,
        metavar="G",
        help="ranks r, s share a node when r // G == s // G: hops between them never lose",
    )
    h.add_argument(
        "--link_loss",
        default=None,
        metavar="SPEC",
        help="per-link loss models, e.g. '3->4=5%%; 0->1=gemodel 1%% 20%%' (a rate or netem text)",
    )


def _add_original_flags(p: argparse.ArgumentParser) -> None:
    """The original study's flags, with its names, defaults and meanings."""
    g = p.add_argument_group("the original study's flags")
    g.add_argument("--num_epochs", "--num-epochs", type=int, default=400, help="epochs per round (>= 1)")
    g.add_argument(
        "--batch_size",
        "--batch-size",
        type=int,
        default=256,
        help="examples per micro-batch PER RANK (>= 1): images, or token sequences for a language "
        "model; global = batch_size x world size",
    )
    g.add_argument(
        "--learning_rate",
        "--learning-rate",
        "--lr",
        type=float,
        default=0.01,
        help="the --optimizer's learning rate (> 0): SGD with momentum 0.9 as in the original, or AdamW",
    )
    g.add_argument(
        "--accumulation_steps",
        "--accumulation-steps",
        type=int,
        default=10,
        help="micro-batches per optimizer step (>= 1), accumulated locally with no_sync()",
    )
    g.add_argument(
        "--loss_rate",
        "--loss-rate",
        type=float,
        default=0.0,
        help="packet loss probability in [0, 1] (Bernoulli; see --loss_model)",
    )
    g.add_argument(
        "--mtu", type=int, default=300, help="gradient payload bytes per packet (>= 4 for fp32 gradients)"
    )
    g.add_argument(
        "--use_zero",
        "--use-zero",
        action="store_true",
        help="lost packets count as zero (fill 'zero'); otherwise fill 'rescale': with --worker_drop "
        "a lost copy is excluded and the mean taken over the copies that arrived; after the "
        "collective (the default drop point) received packets are divided by the expected kept "
        "fraction (1-p for random loss)",
    )
    g.add_argument(
        "--use_avg",
        "--use-avg",
        action="store_true",
        help="average contributions (reduction 'mean'); otherwise sum them",
    )
    g.add_argument(
        "--lab_round",
        "--lab-round",
        type=int,
        default=5,
        help="rounds (repetitions) of the experiment (>= 1), seeds seed+k",
    )
    g.add_argument(
        "--worker_drop",
        "--worker-drop",
        action="store_true",
        help="lose packets at the workers before the allreduce; otherwise after it",
    )


def _add_loss_and_model_flags(x: argparse._ArgumentGroup) -> None:
    """Loss models, drop points, fills, packets, buckets, the model and the strategy."""
    x.add_argument(
        "--loss_model",
        default=None,
        help="netem-style loss model, e.g. 'gemodel 1%% 20%%': "
        + LOSS_MODEL_SYNTAX.replace("%", "%%")
        + "; 'deadline D' needs --bandwidth_gbps; default: random --loss_rate",
    )
    x.add_argument(
        "--drop_point",
        choices=DROP_POINTS,
        default=None,
        help="where packets are lost: worker (each rank's copy, before the allreduce), post (the "
        "result, after it) or both; default: worker if --worker_drop else post (--worker_drop with "
        "--drop_point post is refused as a contradiction)",
    )
    x.add_argument(
        "--post_sync",
        choices=POST_SYNCS,
        default="shared",
        help="post drops: same packets on every rank, or drawn per rank (replicas drift)",
    )
    x.add_argument(
        "--fill",
        choices=FILLS,
        default=None,
        help="what replaces a lost packet (stale: post drop only); default: zero if --use_zero else "
        "rescale (--use_zero with --fill rescale or stale is refused as a contradiction)",
    )
    x.add_argument(
        "--packetization",
        choices=PACKETIZATIONS,
        default="mtu",
        help="mtu-sized packets, or one packet per parameter tensor (the original's granularity)",
    )
    x.add_argument("--bucket_cap_mb", type=float, default=25.0, help="DDP bucket size in MiB (> 0)")
    x.add_argument(
        "--model",
        default="resnet101",
        help=f"torchvision classification model name, or a language model ({', '.join(GPT_CONFIGS)})",
    )
    x.add_argument(
        "--dataset",
        choices=DATASETS,
        default="auto",
        help="auto: text for a language model; else Imagenette if found under --data_path, else the "
        "packaged digits (offline)",
    )
    x.add_argument(
        "--data_path",
        default=None,
        help="images: dataset folder (default ./data; folder: with train/ and val/); text: a text file "
        "or folder of text files (default: the Python standard library's .py sources)",
    )
    x.add_argument(
        "--corpus_mb", type=float, default=1.0, help="text: MiB of text read (> 0), split 9:1 by file"
    )
    x.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="ddp",
        help="ddp: lossy allreduce hook; fsdp: FSDP2 with the lossy reduce-scatter (and all-gather)",
    )


def _add_data_and_run_flags(x: argparse._ArgumentGroup) -> None:
    """The optimizer, data, seeds, evaluation and AMP."""
    x.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="sgd",
        help="sgd (momentum 0.9, the original's) or adamw (betas 0.9/0.95, weight decay 0.1 on matrices)",
    )
    x.add_argument(
        "--all_gather_loss_rate",
        type=float,
        default=0.0,
        help="--strategy fsdp: Bernoulli loss in [0, 1) of parameter packets in FSDP's all-gather",
    )
    x.add_argument(
        "--all_gather_fill",
        choices=("stale", "zero"),
        default="stale",
        help="--strategy fsdp: a lost parameter packet keeps its last received value, or is zero",
    )
    x.add_argument(
        "--imagenette_size", choices=tuple(IMAGENETTE_SIZES), default="320px", help="Imagenette variant"
    )
    x.add_argument("--download", action="store_true", help="download Imagenette (needs internet)")
    x.add_argument(
        "--workers",
        type=int,
        default=2,
        help="DataLoader worker processes per rank (>= 0; in-memory digits use 0)",
    )
    x.add_argument("--seed", type=int, default=0, help="base seed (>= 0); round k uses seed+k")
    x.add_argument(
        "--max_steps",
        type=int,
        default=None,
        help="stop each round after this many optimizer steps (>= 1; per round, so a run takes up "
        "to --lab_round times as many), for smoke runs; default: no limit",
    )
    x.add_argument("--eval_every", type=int, default=1, help="validate every N epochs (>= 1) and at the end")
    x.add_argument(
        "--amp",
        action="store_true",
        help="fp16 autocast + GradScaler (on CPU too, slowly: for checks); steps the scaler skips "
        "for overflow are counted (skipped_steps) and kept out of the epoch's averages",
    )
    x.add_argument(
        "--amp_init_scale",
        type=float,
        default=2.0**16,
        help="GradScaler's initial loss scale (> 0; with --amp)",
    )
    x.add_argument(
        "--backend",
        choices=("auto", "nccl", "gloo"),
        default="auto",
        help="auto: nccl with CUDA, else gloo; gloo runs ranks on the CPU",
    )


def _add_run_folder_flags(x: argparse._ArgumentGroup) -> None:
    """The run folder, resume and overwrite, and what a run measures besides loss."""
    x.add_argument("--output_dir", default="runs", help="root folder of the configuration folders")
    x.add_argument("--tag", default="", help="extra text appended to the configuration folder name")
    x.add_argument(
        "--resume", action="store_true", help="continue this configuration from its last finished epoch"
    )
    x.add_argument("--overwrite", action="store_true", help="delete this configuration's results first")
    x.add_argument(
        "--tensorboard",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="also write each epoch's metrics, loss rates and per-bucket loss as TensorBoard scalars, "
        "one run per round: alone, under the configuration folder (<config>/tensorboard/round<k>); "
        "with DIR, in DIR/<config>/round<k> (needs the tensorboard extra; default off)",
    )
    x.add_argument(
        "--measure_fidelity",
        action="store_true",
        help="also compute the lossless aggregate; log cosine and relative L2 error per epoch",
    )
    x.add_argument(
        "--measure_drift",
        type=int,
        default=0,
        metavar="N",
        help="every N optimizer steps measure replica drift (0 = off)",
    )
    x.add_argument(
        "--resync",
        type=int,
        default=0,
        metavar="N",
        help="every N optimizer steps broadcast rank 0's parameters (0 = off)",
    )
    x.add_argument(
        "--counts_transport",
        choices=COUNTS_TRANSPORTS,
        default="auto",
        help="worker rescale: arrival counts by an extra small allreduce, appended to the bucket, "
        "or regenerated locally from every rank's seed (no communication); auto: regenerate "
        f"on CPU with <= {AUTO_REGENERATE_MAX_WORLD} ranks, else separate",
    )


def _add_technique_flags(p: argparse.ArgumentParser) -> None:
    """Encodings and protection."""
    e = p.add_argument_group("encodings and protection (docs/semantics.md)")
    e.add_argument(
        "--encoding",
        choices=ENCODINGS,
        default=OPTION_DEFAULTS["encoding"],
        help="hadamard: send each bucket rotated in blocks by a random-sign Hadamard transform",
    )
    e.add_argument(
        "--hadamard_block",
        type=int,
        default=OPTION_DEFAULTS["hadamard_block"],
        help="Hadamard block in elements (a power of two >= 2)",
    )
    e.add_argument(
        "--wire_dtype",
        choices=tuple(WIRE_DTYPES),
        default=OPTION_DEFAULTS["wire_dtype"],
        help="dtype of the packets: fp32 = the bucket's own; fp16/bf16 halve the bytes (mtu // 2 elements)",
    )
    e.add_argument(
        "--error_feedback",
        action="store_true",
        help="worker drop with --use_zero: each rank resends what its uplink lost in its next step",
    )
    e.add_argument(
        "--protect",
        default=None,
        metavar="REGEX",
        help="parameters whose packets are never lost, by name (e.g. 'bias|bn|downsample.1')",
    )
    e.add_argument(
        "--retransmit",
        type=int,
        default=0,
        metavar="K",
        help="resend a lost packet up to K times (whole K >= 0; 0 = off)",
    )
    e.add_argument(
        "--fec",
        type=int,
        nargs=2,
        default=None,
        metavar=("G", "R"),
        help="R parity packets per G data packets (any G of G+R rebuild the group)",
    )


def _add_network_flags(p: argparse.ArgumentParser) -> None:
    """The simulated network (off without --bandwidth_gbps)."""
    n = p.add_argument_group("simulated network time (docs/semantics.md; off without --bandwidth_gbps)")
    n.add_argument(
        "--bandwidth_gbps",
        type=float,
        default=None,
        help="link bandwidth in Gbit/s (> 0): price every collective on a simulated clock (alpha-beta "
        "ring allreduce for --algorithm ps, step by step on its links for a per-hop algorithm) and enable "
        "--loss_model 'deadline D' / 'deadline adaptive ...'",
    )
    n.add_argument(
        "--latency_us",
        type=float,
        default=NETWORK_DEFAULTS["latency_us"],
        help="per-message latency alpha in us (>= 0)",
    )
    n.add_argument(
        "--jitter",
        default=NETWORK_DEFAULTS["jitter"],
        help="extra delay per packet: 'none', 'lognormal MU SIGMA' (ln of us), 'pareto XM A' (Lomax, us)",
    )
    n.add_argument(
        "--straggler_prob",
        type=float,
        default=NETWORK_DEFAULTS["straggler_prob"],
        help="probability in [0, 1] that a rank straggles at a collective (per rank and call)",
    )
    n.add_argument(
        "--straggler_factor",
        type=float,
        default=NETWORK_DEFAULTS["straggler_factor"],
        help="a straggler's packets take this many times longer (>= 1)",
    )
    n.add_argument(
        "--net_drop_rate",
        type=float,
        default=NETWORK_DEFAULTS["net_drop_rate"],
        help="share of packets the network drops, in [0, 1): lost by the deadline transport, resent by "
        "the reliable one",
    )
    n.add_argument(
        "--rto_us",
        type=float,
        default=NETWORK_DEFAULTS["rto_us"],
        help="the reliable transport's retransmission timeout in us (> 0)",
    )
    n.add_argument(
        "--target_acc",
        type=float,
        default=None,
        help="validation accuracy in (0, 1]: summary.csv gets each round's (simulated) time to reach it",
    )

"""The study script's flags: ``build_parser()`` (every flag's name, default, unit and range in
its help). Their checks, and how they become the run configuration and the hook's settings,
are in :mod:`lossy_hooks.study.cli`.
"""

from __future__ import annotations

import argparse
from typing import Any

from lossy_hooks.core.options import LossConfig
from lossy_hooks.loss_models import LOSS_MODEL_SYNTAX
from lossy_hooks.study.parallel import STRATEGIES
from lossy_hooks.study.pipelining import PP_SCHEDULES
from lossy_hooks.study.run_names import NETWORK_DEFAULTS
from lossy_hooks.study.traffic import TRAFFIC_FILLS
from lossy_hooks.study.workloads.data import DATASETS, IMAGENETTE_SIZES
from lossy_hooks.study.workloads.gpt import GPT_CONFIGS

__all__ = ["OPTIMIZERS", "add_setting_flag", "build_parser"]

OPTIMIZERS = ("sgd", "adamw")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` except where the default is None: those flags say in their
    own text what happens when they are not given."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_setting_flag(
    group: argparse._ActionsContainer, name: str, *aliases: str, note: str = "", **kwargs: Any
) -> argparse.Action:
    """The flag ``--name`` (and ``aliases``) of the :class:`~lossy_hooks.core.options.LossConfig`
    setting ``name``: its default, choices and help (meaning, unit, allowed values) from the
    setting's one declaration; a bool setting is a switch. ``note`` adds what the flag means
    in the study; ``kwargs`` (``type``, ``metavar``, ``nargs``, a study default) go to argparse."""
    default, declared = LossConfig.declared()[name]
    kwargs.setdefault("default", default)
    if declared.choices is not None:
        kwargs.setdefault("choices", declared.choices)
    if isinstance(default, bool):
        kwargs.setdefault("action", "store_false" if default else "store_true")
    text = declared.help_text(note, allowed=not isinstance(default, bool)).replace("%", "%%")
    return group.add_argument(f"--{name}", *aliases, help=text, **kwargs)


def _choices(name: str) -> tuple[str, ...] | None:
    """The declared choices of setting ``name`` (a flag of its own semantics, same values)."""
    return LossConfig.declared()[name][1].choices


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
    _add_traffic_flags(p)
    return p


def _add_traffic_flags(p: argparse.ArgumentParser) -> None:
    """Model parallelism and the loss of its traffic (lossy_hooks.study.traffic)."""
    t = p.add_argument_group("traffic beyond data parallelism (docs/semantics.md)")
    t.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel size (>= 1; > 1 for a language model only): W = dp x pp x tp, ranks "
        "r*tp .. r*tp+tp-1 one tp group; it must divide the model's attention heads; composes with "
        "--pp and --ep (MoE)",
    )
    t.add_argument(
        "--sequence_parallel",
        action="store_true",
        help="with --tp > 1: Megatron's sequence parallelism, the residual stream and the blocks' norms "
        "split along the sequence over the tp group (each all-reduce of the tp traffic becomes a "
        "reduce-scatter and an all-gather)",
    )
    t.add_argument(
        "--pp",
        type=int,
        default=1,
        help="pipeline-parallel stages (>= 1; > 1 for a language model, at most its layers): "
        "W = dp x pp x tp, the ranks (d*pp+s)*tp+t of s = 0..pp-1 one pipeline, --accumulation_steps its "
        "micro-batches",
    )
    t.add_argument(
        "--pp_schedule",
        choices=PP_SCHEDULES,
        default="gpipe",
        help="the pipeline's schedule (with --pp > 1): gpipe (every forward, then every backward) or "
        "1f1b (one forward, one backward; --accumulation_steps >= --pp)",
    )
    t.add_argument(
        "--ep",
        type=int,
        default=1,
        help="expert-parallel size (>= 1; > 1 for an MoE model, moe-*), within data parallelism: ep "
        "consecutive replicas share their tokens' experts (all-to-all dispatch and combine); it must "
        "divide the data-parallel size W / (tp x pp) and the experts",
    )
    t.add_argument(
        "--traffic_loss",
        default=None,
        metavar="TYPE=RATE[,TYPE=RATE...]",
        help="loss of model-parallel traffic: TYPE tp, pp or ep (the run's --tp/--pp/--ep > 1), RATE a "
        "fraction (0.05), a percentage (5%%) or netem loss model text (as --loss_model); default: none lost",
    )
    t.add_argument(
        "--traffic_fill",
        choices=TRAFFIC_FILLS,
        default="zero",
        help="what replaces a lost packet of every --traffic_loss type: zero (lost at the sender), "
        "stale (the last value received: lost at the receivers), rescale (sums only: refused for tp, pp "
        "and ep, whose groups deliver all-gathers, point-to-point messages and all-to-alls)",
    )


def _add_placement_flags(p: argparse.ArgumentParser) -> None:
    """Where a collective loses packets: the algorithm, per hop (core/placement)."""
    h = p.add_argument_group("where packets are lost: per hop of the collective (docs/semantics.md)")
    add_setting_flag(h, "algorithm", note="--loss_rate per link transmission")
    add_setting_flag(h, "ranks_per_node", type=int, metavar="G")
    add_setting_flag(h, "link_loss", metavar="SPEC")


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
    # the original study's MTU, not LossConfig's
    add_setting_flag(g, "mtu", type=int, default=300, note=">= 4 for fp32 gradients")
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
        choices=_choices("drop_point"),
        default=None,
        help="where packets are lost: worker (each rank's copy, before the allreduce), post (the "
        "result, after it) or both; default: worker if --worker_drop else post (--worker_drop with "
        "--drop_point post is refused as a contradiction)",
    )
    add_setting_flag(x, "post_sync")
    x.add_argument(
        "--fill",
        choices=_choices("fill"),
        default=None,
        help="what replaces a lost packet (stale: post drop only); default: zero if --use_zero else "
        "rescale (--use_zero with --fill rescale or stale is refused as a contradiction)",
    )
    add_setting_flag(x, "packetization")
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
    add_setting_flag(x, "measure_fidelity", note="logged per epoch")
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
    add_setting_flag(x, "counts_transport")


def _add_technique_flags(p: argparse.ArgumentParser) -> None:
    """Encodings and protection."""
    e = p.add_argument_group("encodings and protection (docs/semantics.md)")
    add_setting_flag(e, "encoding")
    add_setting_flag(e, "hadamard_block", type=int)
    add_setting_flag(e, "wire_dtype")
    add_setting_flag(e, "error_feedback", note="--worker_drop with --use_zero")
    add_setting_flag(e, "protect", metavar="REGEX", note="e.g. 'bias|bn|downsample.1'")
    add_setting_flag(e, "retransmit", type=int, metavar="K")
    add_setting_flag(e, "fec", type=int, nargs=2, metavar=("G", "R"))


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

"""The study's command line: train_ddp.py's flags, their checks, and the run configuration.

In the package so that the study script and the tools that launch it (``sweep``) share one
parser and one set of checks: ``build_parser()`` then ``resolve(args, parser)`` gives the
configuration dict that names the run folder (``run_io.config_name``), is saved as
config.json, and builds the hook's :class:`~lossy_hooks.LossyState` (``hook_kwargs``).
Every check runs here, before any process group or file exists; a bad flag exits 2 with a
message naming it and its allowed range.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import torch

from lossy_hooks.core.encoding import ENCODINGS, WIRE_DTYPES
from lossy_hooks.core.netclock import NetworkModel
from lossy_hooks.core.options import (
    AUTO_REGENERATE_MAX_WORLD,
    COUNTS_TRANSPORTS,
    DROP_POINTS,
    FILLS,
    OPTION_DEFAULTS,
    PACKETIZATIONS,
    POST_SYNCS,
    unused_settings,
)
from lossy_hooks.core.state import LossyState
from lossy_hooks.core.streams import derive_seed
from lossy_hooks.loss_models import LOSS_MODEL_SYNTAX, Bernoulli, parse_loss_model, rate_or_none
from lossy_hooks.study.parallel import STRATEGIES, fsdp_api
from lossy_hooks.study.run_io import config_name, read_json, round_status
from lossy_hooks.study.workloads.data import DATASETS, IMAGENETTE_SIZES, check_data_args, resolve_dataset
from lossy_hooks.study.workloads.gpt import GPT_CONFIGS
from lossy_hooks.study.workloads.models import classification_models

__all__ = [
    "CONTROL_FLAGS",
    "OPTIMIZERS",
    "build_parser",
    "gather_kwargs",
    "hook_kwargs",
    "network_of",
    "prepare_run_dir",
    "resolve",
    "study_settings",
]

OPTIMIZERS = ("sgd", "adamw")
GATHER_SEED_STREAM = 77  # the all-gather state's seed: derive_seed(round seed, 77)

# Flags that steer a run but do not change what it computes: a resume may change them.
CONTROL_FLAGS = {
    "resume",
    "overwrite",
    "workers",
    "output_dir",
    "download",
    "data_path",
    "backend",
    "device",
    "target_acc",
}


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
    _add_technique_flags(p)
    _add_network_flags(p)
    return p


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
    """The optimizer, data, seeds, evaluation, AMP, the run folder, resume, measurements."""
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
    x.add_argument("--output_dir", default="runs", help="root folder of the configuration folders")
    x.add_argument("--tag", default="", help="extra text appended to the configuration folder name")
    x.add_argument(
        "--resume", action="store_true", help="continue this configuration from its last finished epoch"
    )
    x.add_argument("--overwrite", action="store_true", help="delete this configuration's results first")
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
        "ring allreduce) and enable --loss_model 'deadline D'",
    )
    n.add_argument("--latency_us", type=float, default=5.0, help="per-message latency alpha in us (>= 0)")
    n.add_argument(
        "--jitter",
        default="none",
        help="extra delay per packet: 'none', 'lognormal MU SIGMA' (ln of us), 'pareto XM A' (Lomax, us)",
    )
    n.add_argument(
        "--straggler_prob",
        type=float,
        default=0.0,
        help="probability in [0, 1] that a rank straggles at a collective (per rank and call)",
    )
    n.add_argument(
        "--straggler_factor",
        type=float,
        default=1.0,
        help="a straggler's packets take this many times longer (>= 1)",
    )
    n.add_argument(
        "--net_drop_rate",
        type=float,
        default=0.0,
        help="share of packets the network drops, in [0, 1): lost by the deadline transport, resent by "
        "the reliable one",
    )
    n.add_argument(
        "--rto_us",
        type=float,
        default=1000.0,
        help="the reliable transport's retransmission timeout in us (> 0)",
    )
    n.add_argument(
        "--target_acc",
        type=float,
        default=None,
        help="validation accuracy in (0, 1]: summary.csv gets each round's (simulated) time to reach it",
    )


NETWORK_FLAGS = ("latency_us", "jitter", "straggler_prob", "straggler_factor", "net_drop_rate", "rto_us")


def network_of(cfg: dict[str, Any]) -> NetworkModel | None:
    """The simulated network of a configuration (``None`` without ``--bandwidth_gbps``)."""
    if cfg.get("bandwidth_gbps") is None:
        return None
    return NetworkModel(
        bandwidth_gbps=cfg["bandwidth_gbps"],
        latency_us=cfg.get("latency_us", 5.0),
        jitter=cfg.get("jitter", "none"),
        straggler_prob=cfg.get("straggler_prob", 0.0),
        straggler_factor=cfg.get("straggler_factor", 1.0),
        drop_rate=cfg.get("net_drop_rate", 0.0),
        rto_us=cfg.get("rto_us", 1000.0),
    )


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Check every flag and derive the run configuration; errors exit 2 before any work."""

    def fail(msg: str) -> None:
        parser.error(msg)

    positive_ints = {
        "num_epochs": 1,
        "batch_size": 1,
        "accumulation_steps": 1,
        "lab_round": 1,
        "eval_every": 1,
    }
    for name, low in positive_ints.items():
        if getattr(args, name) < low:
            fail(f"--{name} must be >= {low}, got {getattr(args, name)}")
    for name in ("workers", "seed", "measure_drift", "resync"):
        if getattr(args, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        fail(f"--max_steps must be >= 1, got {args.max_steps}")
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        fail(f"--learning_rate must be > 0, got {args.learning_rate}")
    if not (0.0 <= args.loss_rate <= 1.0):
        fail(f"--loss_rate must be in [0, 1], got {args.loss_rate}")
    if args.mtu < 4:
        fail(f"--mtu must be >= 4 bytes (one fp32 gradient element), got {args.mtu}")
    if not (args.bucket_cap_mb > 0):
        fail(f"--bucket_cap_mb must be > 0, got {args.bucket_cap_mb}")
    language_model = args.model in GPT_CONFIGS
    if not language_model and args.model not in classification_models():
        fail(
            f"--model {args.model!r} is neither a torchvision classification model "
            f"(e.g. resnet18, resnet101, mobilenet_v3_small, squeezenet1_1) nor a language model "
            f"({', '.join(GPT_CONFIGS)})"
        )
    if language_model and args.dataset not in ("auto", "text"):
        fail(f"--model {args.model} is a language model: --dataset text (or auto), got {args.dataset}")
    if not language_model and args.dataset == "text":
        fail(f"--dataset text needs a language model (--model {'|'.join(GPT_CONFIGS)}), got {args.model}")
    if not (args.corpus_mb > 0 and math.isfinite(args.corpus_mb)):
        fail(f"--corpus_mb must be > 0, got {args.corpus_mb}")
    msg = check_data_args(
        "text" if language_model else args.dataset, args.data_path, args.download, args.imagenette_size
    )
    if msg:
        fail(msg)
    if args.bandwidth_gbps is None:
        changed = [f"--{f}" for f in NETWORK_FLAGS if getattr(args, f) != parser.get_default(f)]
        if changed:
            fail(f"{', '.join(changed)}: the simulated network needs --bandwidth_gbps")
    else:
        try:
            network_of(vars(args))
        except ValueError as e:
            fail("--" + str(e).replace("drop_rate", "net_drop_rate"))
    if args.target_acc is not None and not (0 < args.target_acc <= 1):
        fail(f"--target_acc must be in (0, 1], got {args.target_acc}")
    if not (0.0 <= args.all_gather_loss_rate < 1.0):
        fail(f"--all_gather_loss_rate must be in [0, 1), got {args.all_gather_loss_rate}")
    if args.strategy == "ddp" and args.all_gather_loss_rate > 0:
        fail("--all_gather_loss_rate needs --strategy fsdp (DDP has no parameter all-gather)")
    if args.strategy == "fsdp":
        ddp_only = {
            "--amp": args.amp,
            "--resync": args.resync,
            "--measure_drift": args.measure_drift,
            "--measure_fidelity": args.measure_fidelity,
            "--bucket_cap_mb": args.bucket_cap_mb != parser.get_default("bucket_cap_mb"),
        }
        given = [flag for flag, on in ddp_only.items() if on]
        if given:
            fail(
                f"{', '.join(given)}: DDP only, not with --strategy fsdp (FSDP has no replicas, buckets "
                "or GradScaler path here; use its MixedPrecisionPolicy for low precision)"
            )
    if not (args.amp_init_scale > 0 and math.isfinite(args.amp_init_scale)):
        fail(f"--amp_init_scale must be > 0, got {args.amp_init_scale}")
    if args.backend == "nccl" and not torch.cuda.is_available():
        fail("--backend nccl needs CUDA (no GPU found); use --backend gloo")
    if args.error_feedback and args.amp:
        fail("--error_feedback with --amp: residuals would carry one step's loss scale into the next")
    if args.loss_model is not None and args.loss_rate != 0.0:
        fail("give --loss_rate or --loss_model, not both")
    try:
        model_spec = parse_loss_model(args.loss_model) if args.loss_model else Bernoulli(args.loss_rate)
    except ValueError as e:
        fail(f"--loss_model: {e}")
    drop_point = args.drop_point or ("worker" if args.worker_drop else "post")
    if args.drop_point and args.worker_drop and args.drop_point == "post":
        fail("--worker_drop contradicts --drop_point post")
    fill = args.fill or ("zero" if args.use_zero else "rescale")
    if args.fill and args.use_zero and args.fill != "zero":
        fail(f"--use_zero contradicts --fill {args.fill}")
    reduction = "mean" if args.use_avg else "sum"
    world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    cfg = {k: v for k, v in vars(args).items()}
    cfg.update(
        drop_point=drop_point,
        fill=fill,
        reduction=reduction,
        loss_model=model_spec.spec,
        long_run_loss_rate=rate_or_none(model_spec),
        world_size=world,
        dataset=resolve_dataset(args.dataset, args.data_path, args.imagenette_size, language_model),
        dataset_flag=args.dataset,
    )
    if args.strategy == "fsdp":
        try:
            fsdp = fsdp_api()
        except RuntimeError as e:
            fail(str(e))
    try:
        state = LossyState(**hook_kwargs(cfg))
        if args.strategy == "fsdp":
            fsdp.check_state(state)
            if args.all_gather_loss_rate > 0:
                fsdp.gather_state(**gather_kwargs(cfg))
    except ValueError as e:
        fail(f"invalid loss settings: {e}")
    return cfg


def hook_kwargs(cfg: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """:class:`~lossy_hooks.LossyState` arguments of a resolved configuration (the one place
    where study flags become hook settings)."""
    return dict(
        loss_model=parse_loss_model(cfg["loss_model"]),
        mtu=cfg["mtu"],
        drop_point=cfg["drop_point"],
        fill=cfg["fill"],
        reduction=cfg["reduction"],
        post_sync=cfg["post_sync"],
        packetization=cfg["packetization"],
        counts_transport=cfg["counts_transport"],
        measure_fidelity=cfg["measure_fidelity"],
        seed=seed,
        network=network_of(cfg),
    ) | options_of(cfg)


def gather_kwargs(cfg: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """:func:`lossy_hooks.fsdp.gather_state` arguments (``--strategy fsdp``): its own seed
    (streams independent of the reduce-scatter's)."""
    return dict(
        loss_rate=cfg.get("all_gather_loss_rate", 0.0),
        fill=cfg.get("all_gather_fill", "stale"),
        mtu=cfg["mtu"],
        seed=derive_seed(seed, GATHER_SEED_STREAM),
    )


def options_of(cfg: dict[str, Any]) -> dict[str, Any]:
    """The encoding and protection settings of a configuration (a config saved before they
    existed has none: their defaults)."""
    out = {k: cfg.get(k, default) for k, default in OPTION_DEFAULTS.items()}
    out["fec"] = None if out["fec"] is None else tuple(out["fec"])
    return out


def study_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in CONTROL_FLAGS and k != "environment"}


def prepare_run_dir(cfg: dict[str, Any], parser: argparse.ArgumentParser) -> Path:
    """Decide fresh / resume / refuse, reading only the file system (before any process group)."""
    run_dir = Path(cfg["output_dir"]) / config_name(cfg)
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists() or cfg["overwrite"]:
        return run_dir
    if not cfg["resume"]:
        done = sum(1 for k in range(cfg["lab_round"]) if round_status(run_dir / f"round{k}"))
        state = (
            "finished" if done == cfg["lab_round"] else f"unfinished ({done}/{cfg['lab_round']} rounds ended)"
        )
        parser.error(
            f"{run_dir} already holds a {state} run of this configuration; "
            "pass --resume to continue it or --overwrite to start over"
        )
    # a flag added since the saved run started counts as its default there
    saved = {k: parser.get_default(k) for k in study_settings(cfg)} | study_settings(read_json(cfg_path))
    now = study_settings(cfg)
    unused = unused_settings(saved) & unused_settings(now)  # e.g. a Hadamard block without Hadamard
    diff = {
        k: (saved.get(k), now.get(k))
        for k in sorted((set(saved) | set(now)) - unused)
        if saved.get(k) != now.get(k)
    }
    if diff:
        lines = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
        parser.error(f"--resume: flags differ from {cfg_path}: {lines}")
    return run_dir

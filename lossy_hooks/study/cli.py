"""The study's command line: the checks of train_ddp.py's flags, and the run configuration.

The study script and the tools that launch it (``sweep``) share one parser
(:func:`lossy_hooks.study.flags.build_parser`) and one set of checks: ``resolve(args, parser)`` gives the
configuration dict that names the run folder (``run_names.config_name``), is saved as
config.json, and builds the hook's :class:`~lossy_hooks.LossyState` (``hook_kwargs``).
Every check runs here, before any process group or file exists; a bad flag exits 2 with a
message naming it and its allowed range.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lossy_hooks.core.network import NetworkModel
from lossy_hooks.core.options import OPTION_DEFAULTS, LossConfig, unused_settings
from lossy_hooks.core.state import LossyState
from lossy_hooks.core.streams import Stream, derive_seed
from lossy_hooks.loss_models import Bernoulli, parse_loss_model, rate_or_none
from lossy_hooks.study.extras import MissingExtraError
from lossy_hooks.study.mesh import MeshShape
from lossy_hooks.study.parallel import fsdp_api
from lossy_hooks.study.run_io import read_json, round_status
from lossy_hooks.study.run_names import CONTROL_FLAGS, NETWORK_DEFAULTS, NETWORK_FIELD_OF_FLAG, config_name
from lossy_hooks.study.tensorboard_log import check_available
from lossy_hooks.study.traffic import canonical, parse_traffic_loss, traffic_problem
from lossy_hooks.study.workloads.data import check_data_args, resolve_dataset
from lossy_hooks.study.workloads.gpt import GPT_CONFIGS
from lossy_hooks.study.workloads.models import classification_models

__all__ = [
    "CONTROL_FLAGS",
    "gather_kwargs",
    "hook_kwargs",
    "network_of",
    "prepare_run_dir",
    "resolve",
    "study_settings",
]


NETWORK_FLAGS = tuple(f for f in NETWORK_FIELD_OF_FLAG if f != "bandwidth_gbps")  # need --bandwidth_gbps


def network_of(cfg: dict[str, Any]) -> NetworkModel | None:
    """The simulated network of a configuration (``None`` without ``--bandwidth_gbps``; a flag
    missing from a saved configuration takes the model's default)."""
    if cfg.get("bandwidth_gbps") is None:
        return None
    return NetworkModel(
        **{name: cfg.get(flag, NETWORK_DEFAULTS[flag]) for flag, name in NETWORK_FIELD_OF_FLAG.items()}
    )


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Check every flag and derive the run configuration; errors exit 2 before any work
    (the checks run in this order, so the first bad flag is the one reported)."""

    def fail(msg: str) -> None:
        parser.error(msg)

    _check_ranges(args, fail)
    language_model = args.model in GPT_CONFIGS
    _check_workload(args, parser, fail, language_model)
    _check_combinations(args, parser, fail)
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
    traffic_loss = _check_traffic(args, fail, language_model, world)
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
        traffic_loss=traffic_loss,
    )
    if args.tensorboard is not None:
        try:
            check_available()
        except MissingExtraError as e:
            fail(f"--tensorboard: {e}")
    if args.strategy == "fsdp":
        try:
            fsdp = fsdp_api()
        except RuntimeError as e:
            fail(str(e))
    try:
        state = LossyState(**hook_kwargs(cfg))
        if state.hops is not None and world > 1:  # the links named exist at this world size
            state.hops.check_links(world // (args.tp * args.pp))  # the data-parallel group's ranks
        if args.strategy == "fsdp":
            fsdp.check_state(state)
            if args.all_gather_loss_rate > 0:
                fsdp.gather_state(**gather_kwargs(cfg))
    except ValueError as e:
        fail(f"invalid loss settings: {e}")
    return cfg


def _check_traffic(
    args: argparse.Namespace, fail: Callable[[str], None], language_model: bool, world: int
) -> str | None:
    """``--tp``, ``--pp``, ``--ep`` (:func:`_model_parallel_problem`), ``--traffic_loss`` and
    ``--traffic_fill`` (:func:`lossy_hooks.study.traffic.traffic_problem`). Returns
    ``--traffic_loss`` as the configuration holds it (``tp=random 10%``), or ``None``."""
    for flag in ("tp", "pp", "ep"):
        if getattr(args, flag) < 1:
            fail(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    sizes = {flag: getattr(args, flag) for flag in ("tp", "pp", "ep") if getattr(args, flag) > 1}
    if args.pp_schedule != "gpipe" and "pp" not in sizes:
        fail(f"--pp_schedule {args.pp_schedule} needs --pp > 1 (a pipeline)")
    if args.sequence_parallel and "tp" not in sizes:
        fail("--sequence_parallel needs --tp > 1 (it splits the tensor-parallel group's sequence)")
    if sizes:
        problem = _model_parallel_problem(args, sizes, language_model, world)
        if problem:
            fail(problem)
    problem = traffic_problem(vars(args))
    if problem:
        fail(problem)
    return canonical(parse_traffic_loss(args.traffic_loss)) if args.traffic_loss else None


def _model_parallel_problem(
    args: argparse.Namespace, sizes: dict[str, int], language_model: bool, world: int
) -> str | None:
    """Why ``sizes`` (``--tp``, ``--pp``, ``--ep`` given > 1, composable) cannot run with the
    other flags, or ``None``: ``tp`` divides the heads (a language model's); ``pp`` stages a
    GPT in at most its layers, without AMP
    (the schedule runs the backward: no GradScaler); ``ep`` divides an MoE model's experts;
    the world is ``dp x pp x tp`` with ``ep`` dividing dp
    (:class:`~lossy_hooks.study.mesh.MeshShape`); none goes with the replica flags (they
    compare or copy whole replicas over the world)."""
    given = " with ".join(f"--{k} {v}" for k, v in sizes.items())
    if not language_model:
        return f"{given} needs a language model (--model {'|'.join(GPT_CONFIGS)}), got {args.model}"
    cfg = GPT_CONFIGS[args.model]
    tp, pp, ep = (sizes.get(k, 1) for k in ("tp", "pp", "ep"))
    if cfg.n_head % tp:
        return f"--tp {tp} must divide the {cfg.n_head} attention heads of {args.model}"
    if pp > 1:
        if pp > cfg.n_layer:
            return f"--pp {pp}: more stages than the {cfg.n_layer} layers of {args.model}"
        if args.amp:
            return f"--pp {pp} with --amp: the pipeline schedule runs the backward, without a GradScaler"
        if args.pp_schedule == "1f1b" and args.accumulation_steps < pp:
            return (
                f"--pp_schedule 1f1b needs --accumulation_steps >= --pp {pp} (its micro-batches fill the "
                f"pipeline), got {args.accumulation_steps}"
            )
    if ep > 1:
        if args.sequence_parallel:
            return (
                f"--sequence_parallel with --ep {ep}: the MoE layer takes the gathered sequence (its experts "
                "whole on each tp rank), so every tp rank would exchange every token and keep 1/tp of them"
            )
        if cfg.moe is None:
            moe = "|".join(name for name, c in GPT_CONFIGS.items() if c.moe is not None)
            return f"--ep {ep} needs an MoE model (--model {moe}), got {args.model}"
        if cfg.moe.n_expert % ep:
            return f"--ep {ep} must divide the {cfg.moe.n_expert} experts of {args.model}"
    try:
        MeshShape(world, tp, pp, ep)
    except ValueError as e:
        return str(e)
    replica_flags = [f"--{f}" for f in ("measure_drift", "resync") if getattr(args, f)]
    if replica_flags:
        return (
            f"{', '.join(replica_flags)} with {given}: they compare or copy whole replicas over "
            "the world, and model-parallel ranks hold different parameters"
        )
    return None


def _check_ranges(args: argparse.Namespace, fail: Callable[[str], None]) -> None:
    """Counts, rates and sizes in their ranges."""
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


def _check_workload(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    fail: Callable[[str], None],
    language_model: bool,
) -> None:
    """The model, its data, and the simulated network."""
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


def _check_combinations(
    args: argparse.Namespace, parser: argparse.ArgumentParser, fail: Callable[[str], None]
) -> None:
    """Flags that exclude each other: FSDP against DDP-only flags, AMP, the backend."""
    if not (0.0 <= args.all_gather_loss_rate < 1.0):
        fail(f"--all_gather_loss_rate must be in [0, 1), got {args.all_gather_loss_rate}")
    if args.strategy == "ddp" and args.all_gather_loss_rate > 0:
        fail("--all_gather_loss_rate needs --strategy fsdp (DDP has no parameter all-gather)")
    if args.strategy == "fsdp":
        ddp_only = {
            "--amp": args.amp,
            "--resync": args.resync,
            "--measure_drift": args.measure_drift,
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


def hook_kwargs(cfg: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """:class:`~lossy_hooks.LossyState` arguments of a resolved configuration (the one place
    where study flags become hook settings): the :class:`LossConfig` core settings of the
    same names, the options (:func:`options_of`), the seed and the network."""
    core = {name: cfg[name] for name in LossConfig.names("core") if name not in ("loss_model", "seed")}
    model = parse_loss_model(cfg["loss_model"])
    return core | dict(loss_model=model, seed=seed, network=network_of(cfg)) | options_of(cfg)


def gather_kwargs(cfg: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """:func:`lossy_hooks.fsdp.gather_state` arguments (``--strategy fsdp``): its own seed
    (streams independent of the reduce-scatter's); the same algorithm and links."""
    placement = {
        k: v for k, v in options_of(cfg).items() if k in ("algorithm", "ranks_per_node", "link_loss")
    }
    return dict(
        loss_rate=cfg.get("all_gather_loss_rate", 0.0),
        fill=cfg.get("all_gather_fill", "stale"),
        mtu=cfg["mtu"],
        seed=derive_seed(seed, Stream.ALL_GATHER),
        **placement,
    )


def options_of(cfg: dict[str, Any]) -> dict[str, Any]:
    """The option settings of a configuration (:class:`LossConfig`'s ``"option"`` group; a
    config saved before one existed has none: its default)."""
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

"""The name of a run folder (``config_name``): every setting that changes what a run
computes and differs from its default is in it, so two configurations never share a folder.

- Readable parts first (dataset, model, W, drop point, fill, ..., the encodings, the
  network), then one part per other setting off its default (``ep6``, ``bs32``,
  ``lr0p02``, ``seed1``, ``r2`` for the rounds, ``steps20``, ``eval-every2``, ...), the tag
  last. A setting at its default adds nothing, so a configuration saved before a setting
  existed keeps its name.
- A name longer than ``MAX_NAME_CHARS`` keeps its first parts and ends in
  ``cfg<HASH>``: the first ``HASH_CHARS`` hex digits of the SHA-256 of the configuration's
  identity (:func:`config_identity`: every setting off its default, as sorted JSON), which
  config.json holds in full.

Settings that only steer a run (``CONTROL_FLAGS``: output folder, resume, workers,
...) are not part of a configuration. Also here: the study's network flags with the model's
defaults."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from typing import Any

from lossy_hooks.core.network import NetworkModel
from lossy_hooks.core.options import OPTION_DEFAULTS, unused_settings

__all__ = [
    "ALIAS_FLAGS",
    "CONTROL_FLAGS",
    "HASH_CHARS",
    "MAX_NAME_CHARS",
    "NAMED_SETTINGS",
    "NETWORK_DEFAULTS",
    "NETWORK_FIELD_OF_FLAG",
    "config_identity",
    "config_name",
    "option_parts",
    "setting_parts",
    "workload_parts",
]

# a folder name is at most this long (file systems allow 255 bytes); past it, a hash
MAX_NAME_CHARS = 200
HASH_CHARS = 12

# the study's network flags -> NetworkModel's fields (their defaults are the model's)
NETWORK_FIELD_OF_FLAG = {
    "bandwidth_gbps": "bandwidth_gbps",
    "latency_us": "latency_us",
    "jitter": "jitter",
    "straggler_prob": "straggler_prob",
    "straggler_factor": "straggler_factor",
    "net_drop_rate": "drop_rate",
    "rto_us": "rto_us",
}
_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(NetworkModel)}
NETWORK_DEFAULTS: dict[str, Any] = {
    flag: _MODEL_DEFAULTS[name] for flag, name in NETWORK_FIELD_OF_FLAG.items()
}


def _slug(text: str) -> str:
    text = text.replace("%", "pct").replace(".", "p")
    return re.sub(r"[^A-Za-z0-9p]+", "-", text).strip("-")


# flags that steer a run but do not change what it computes: a resume may change them.
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
    "tensorboard",
}
# flags the configuration holds through the settings they resolve to (``loss_rate`` ->
# ``loss_model``, ``worker_drop`` -> ``drop_point``, ``use_avg`` -> ``reduction``, ...)
ALIAS_FLAGS = frozenset(
    {"loss_rate", "worker_drop", "use_zero", "use_avg", "long_run_loss_rate", "dataset_flag"}
)
# settings with a readable part of their own (config_name's first parts, option_parts,
# workload_parts); a setting such a part leaves out is one without effect there (post_sync
# at drop_point="worker", mtu with whole-tensor packets, the network without a clock, ...)
NAMED_SETTINGS = frozenset(
    {
        "dataset",
        "model",
        "world_size",
        "drop_point",
        "post_sync",
        "fill",
        "reduction",
        "packetization",
        "mtu",
        "accumulation_steps",
        "loss_model",
        "bucket_cap_mb",
        "tag",
        "strategy",
        "all_gather_loss_rate",
        "all_gather_fill",
        "optimizer",
        "corpus_mb",
        "tp",
        "sequence_parallel",
        "pp",
        "pp_schedule",
        "ep",
        "traffic_loss",
        "traffic_fill",
        *NETWORK_FIELD_OF_FLAG,
        *OPTION_DEFAULTS,
    }
)
# short labels of the other settings' parts (any other: the flag's name, '-' for '_')
_SHORT_LABEL = {
    "num_epochs": "ep",
    "batch_size": "bs",
    "learning_rate": "lr",
    "seed": "seed",
    "lab_round": "r",
    "max_steps": "steps",
}


@functools.lru_cache(maxsize=1)
def _flag_defaults() -> dict[str, Any]:
    """Each study flag's default, from the study's one parser (imported here, not at the
    top: the parser's module reads this one's network defaults)."""
    from lossy_hooks.study.flags import build_parser

    return vars(build_parser(prog="train_ddp.py").parse_args([]))


def _off_default(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings of ``cfg`` that make its configuration: those off their flag's default
    (a setting without a flag, e.g. ``world_size``, always), aliases and settings without
    effect (``options.unused_settings``) left out, and no control flag."""
    defaults = _flag_defaults()
    skip = ALIAS_FLAGS | CONTROL_FLAGS | unused_settings(cfg) | {"environment"}
    return {k: v for k, v in cfg.items() if k not in skip and (k not in defaults or v != defaults[k])}


def config_identity(cfg: dict[str, Any]) -> str:
    """The configuration as one canonical text (sorted JSON of :func:`_off_default`): equal
    for two configurations exactly when they compute the same thing, and unchanged when a
    flag is added with its default."""
    return json.dumps(_off_default(cfg), sort_keys=True, default=str, separators=(",", ":"))


def setting_parts(cfg: dict[str, Any]) -> list[str]:
    """One part per setting off its default that has no readable part of its own: first
    ``ep6``, ``bs32``, ``lr0p02``, ``seed1``, ``r2`` (rounds), ``steps20`` in this order, then
    the others by name: ``amp``, ``no-<flag>`` for a flag whose default is on,
    ``<flag>-<value>`` for the rest."""
    order = list(_SHORT_LABEL)
    parts = []
    settings = _off_default(cfg)
    for key in sorted(settings, key=lambda k: (order.index(k) if k in order else len(order), k)):
        value = settings[key]
        if key in NAMED_SETTINGS or value is None:
            continue
        label = _SHORT_LABEL.get(key, key.replace("_", "-"))
        if isinstance(value, bool):
            parts.append(label if value else f"no-{label}")
            continue
        text = _slug(format(value, "g") if isinstance(value, float) else str(value))
        parts.append(label + text if key in _SHORT_LABEL else f"{label}-{text}")
    return parts


def config_name(cfg: dict[str, Any]) -> str:
    """The folder name of configuration ``cfg`` (see the module): readable parts, at most
    ``MAX_NAME_CHARS`` characters, else its first parts and ``cfg<hash of the identity>``."""
    parts = [
        cfg["dataset"],
        cfg["model"],
        f"w{cfg['world_size']}",
        cfg["drop_point"] + (f"-{cfg['post_sync']}" if cfg["drop_point"] != "worker" else ""),
        cfg["fill"],
        cfg["reduction"],
        "pkt-tensor" if cfg["packetization"] == "tensor" else f"mtu{cfg['mtu']}",
        f"acc{cfg['accumulation_steps']}",
        _slug(cfg["loss_model"]),
        f"bucket{_slug(format(cfg['bucket_cap_mb'], 'g'))}mb",
    ]
    parts += option_parts(cfg)
    parts += workload_parts(cfg)
    parts += setting_parts(cfg)
    if cfg.get("tag"):
        parts.append(_slug(cfg["tag"]))
    name = "_".join(parts)
    if len(name) <= MAX_NAME_CHARS:
        return name
    digest = "cfg" + hashlib.sha256(config_identity(cfg).encode()).hexdigest()[:HASH_CHARS]
    head: list[str] = []
    for part in parts:
        if len("_".join([*head, part, digest])) > MAX_NAME_CHARS:
            break
        head.append(part)
    return "_".join([*head, digest])


def workload_parts(cfg: dict[str, Any]) -> list[str]:
    """Name parts of the strategy, the all-gather loss, the model-parallel sizes (``tp2``,
    ``tp2-sp``, ``pp2``, ``pp2-1f1b``, ``moe-ep4``), the
    traffic loss (``tl-tp-random-10pct``, ``-stale`` for a fill other than zero), the optimizer
    and the text budget (none at their defaults: the names of before)."""
    parts = []
    if cfg.get("strategy", "ddp") != "ddp":
        parts.append(cfg["strategy"])
    if cfg.get("all_gather_loss_rate", 0.0):
        parts.append(
            f"ag{_slug(format(cfg['all_gather_loss_rate'], 'g'))}-{cfg.get('all_gather_fill', 'stale')}"
        )
    # the model-parallel size: tp2, pp2, moe-ep4 (a plain "ep4" would read as --num_epochs 4)
    for flag, label in (("tp", "tp"), ("pp", "pp"), ("ep", "moe-ep")):
        if int(cfg.get(flag) or 1) > 1:
            parts.append(f"{label}{cfg[flag]}")
            if flag == "tp" and cfg.get("sequence_parallel"):
                parts[-1] += "-sp"  # tp2-sp
            if flag == "pp" and cfg.get("pp_schedule", "gpipe") != "gpipe":
                parts[-1] += f"-{cfg['pp_schedule']}"  # pp2-1f1b
    if cfg.get("traffic_loss"):  # e.g. "tp=random 10%" -> tl-tp-random-10pct (+ the fill unless zero)
        fill = cfg.get("traffic_fill", "zero")
        parts.append(_slug(f"tl-{cfg['traffic_loss']}" + (f"-{fill}" if fill != "zero" else "")))
    if cfg.get("optimizer", "sgd") != "sgd":
        parts.append(cfg["optimizer"])
    if cfg.get("dataset") == "text" and cfg.get("corpus_mb", 1.0) != 1.0:
        parts.append(f"corpus{_slug(format(cfg['corpus_mb'], 'g'))}mb")
    if cfg.get("bandwidth_gbps") is not None:
        net_cfg = NETWORK_DEFAULTS | {k: v for k, v in cfg.items() if k in NETWORK_DEFAULTS}
        net = [f"net{format(cfg['bandwidth_gbps'], 'g')}g", f"{format(net_cfg['latency_us'], 'g')}us"]
        if net_cfg["jitter"] != NETWORK_DEFAULTS["jitter"]:
            net.append(cfg["jitter"])
        if net_cfg["straggler_prob"] != NETWORK_DEFAULTS["straggler_prob"]:
            net.append(
                f"strag{format(cfg['straggler_prob'], 'g')}x{format(net_cfg['straggler_factor'], 'g')}"
            )
        if net_cfg["net_drop_rate"] != NETWORK_DEFAULTS["net_drop_rate"]:
            net.append(f"drop{format(cfg['net_drop_rate'], 'g')}")
        if net_cfg["rto_us"] != NETWORK_DEFAULTS["rto_us"]:
            net.append(f"rto{format(cfg['rto_us'], 'g')}")
        parts.append(_slug("-".join(net)))
    return parts


def option_parts(cfg: dict[str, Any]) -> list[str]:
    """Name parts of the encodings and protections in use (none: the names of before)."""
    cfg = OPTION_DEFAULTS | {k: v for k, v in cfg.items() if k in OPTION_DEFAULTS}
    parts = []
    if cfg["algorithm"] != OPTION_DEFAULTS["algorithm"]:
        parts.append(cfg["algorithm"])
    if cfg.get("ranks_per_node"):
        parts.append(f"node{cfg['ranks_per_node']}")
    if cfg.get("link_loss"):
        link_loss = cfg["link_loss"]
        text = link_loss if isinstance(link_loss, str) else ";".join(f"{k}={v}" for k, v in link_loss.items())
        parts.append("links-" + _slug(text.replace("->", "to")))
    if cfg["encoding"] != OPTION_DEFAULTS["encoding"]:
        parts.append(f"{cfg['encoding']}{cfg['hadamard_block']}")
    if cfg["wire_dtype"] != OPTION_DEFAULTS["wire_dtype"]:
        parts.append(f"wire-{cfg['wire_dtype']}")
    if cfg.get("error_feedback"):
        parts.append("ef")
    if cfg.get("protect"):
        parts.append("protect-" + _slug(cfg["protect"]))
    if cfg.get("fec"):
        parts.append(f"fec{cfg['fec'][0]}-{cfg['fec'][1]}")
    if cfg.get("retransmit"):
        parts.append(f"retx{cfg['retransmit']}")
    return parts

"""The name of a run folder: one part per setting that differs between runs of a study
(``config_name``), none for a setting at its default, so a configuration saved before a
setting existed keeps its name; and the study's network flags with the model's defaults."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from lossy_hooks.core.netclock import NetworkModel
from lossy_hooks.core.options import OPTION_DEFAULTS

__all__ = ["NETWORK_DEFAULTS", "NETWORK_FIELD_OF_FLAG", "config_name", "option_parts", "workload_parts"]

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


def config_name(cfg: dict[str, Any]) -> str:
    """A folder name from the settings that differ between runs of a study."""
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
    if cfg.get("tag"):
        parts.append(_slug(cfg["tag"]))
    return "_".join(parts)


def workload_parts(cfg: dict[str, Any]) -> list[str]:
    """Name parts of the strategy, the all-gather loss, the optimizer and the text budget
    (none at their defaults: the names of before)."""
    parts = []
    if cfg.get("strategy", "ddp") != "ddp":
        parts.append(cfg["strategy"])
    if cfg.get("all_gather_loss_rate", 0.0):
        parts.append(
            f"ag{_slug(format(cfg['all_gather_loss_rate'], 'g'))}-{cfg.get('all_gather_fill', 'stale')}"
        )
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

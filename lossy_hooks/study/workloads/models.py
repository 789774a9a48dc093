"""The models of train_ddp.py: torchvision classifiers sized to the dataset, or a GPT
(:mod:`lossy_hooks.study.workloads.gpt`); and its optimizer."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torchvision
from torch import nn

from lossy_hooks.study.workloads.gpt import GPT_CONFIGS, build_gpt

__all__ = ["build_model", "build_optimizer", "classification_models", "logits"]

_BIASES = ("bias", "b_fc", "b_proj")  # by name: no weight decay whatever their shape


def classification_models() -> list[str]:
    """Names of torchvision's image-classification models (``--model`` accepts these)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(name: str, num_classes: int, ep_group: dist.ProcessGroup | None = None) -> nn.Module:
    """A randomly initialised torchvision model with ``num_classes`` outputs, or a GPT (an
    MoE GPT's experts sharded over ``ep_group`` if given: :func:`build_gpt`)."""
    if name in GPT_CONFIGS:
        return build_gpt(name, ep_group)
    if ep_group is not None:
        raise ValueError(f"--model {name!r} has no experts: expert parallelism needs an MoE model (moe-*)")
    if name not in classification_models():
        raise ValueError(f"--model {name!r} is not a torchvision classification model")
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    return torchvision.models.get_model(name, **kwargs)


def logits(output: torch.Tensor | tuple) -> torch.Tensor:
    """The main logits of a model output (some models return named tuples)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def build_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """``sgd``: momentum 0.9 (the original study's); ``adamw``: betas (0.9, 0.95), weight
    decay 0.1 on matrices and embeddings, none on biases and norm gains (GPT practice; the
    MoE experts' stacked biases ``b_fc``, ``b_proj`` are 2-D but biases)."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name != "adamw":
        raise ValueError(f"--optimizer must be sgd or adamw, got {name!r}")
    named = list(model.named_parameters())
    bias = {id(p) for n, p in named if n.rpartition(".")[2] in _BIASES}
    decay = [p for _, p in named if p.dim() >= 2 and id(p) not in bias]
    rest = [p for _, p in named if p.dim() < 2 or id(p) in bias]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))

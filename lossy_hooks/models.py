"""torchvision classification models for train_ddp.py, classifier sized to the dataset."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

__all__ = ["build_model", "classification_models", "logits"]


def classification_models() -> list[str]:
    """Names of torchvision's image-classification models (``--model`` accepts these)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(name: str, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision model with ``num_classes`` outputs."""
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

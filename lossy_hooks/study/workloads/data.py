"""Datasets for train_ddp.py.

- ``digits``: the offline default. 1,797 real handwritten digits (UCI, shipped in this package,
  see assets/DIGITS_SOURCE.txt), 8x8 upscaled to 32x32, 3 channels, a fixed held-out split of
  360 validation images (seeded, stratified by shuffling), normalised with train statistics.
- ``imagenette``: torchvision's Imagenette (``--download`` fetches it where there is internet),
  with the original study's transforms.
- ``folder``: any ImageFolder tree with ``train/`` and ``val/`` (what the original read).
- ``fake``: torchvision FakeData, for throughput runs only.
- ``text``: byte-level text for the language models (``--model gpt-*``, ``moe-*``): the Python standard
  library's own sources by default, or ``--data_path`` (a text file or folder); see
  :mod:`lossy_hooks.study.workloads.text_data`.
- ``auto``: text for a language model; else Imagenette when it is found under
  ``--data_path``, otherwise digits.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets, transforms

from lossy_hooks.study.workloads.text_data import TokenWindows, load_corpus

__all__ = ["DATASETS", "DataSpec", "build_datasets", "check_data_args", "load_digits", "resolve_dataset"]

DATASETS = ("auto", "digits", "imagenette", "folder", "fake", "text")
DEFAULT_IMAGE_PATH = "./data"
IMAGENETTE_SIZES = {"full": "imagenette2", "320px": "imagenette2-320", "160px": "imagenette2-160"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIGITS_VAL = 360
DIGITS_SIZE = 32


@dataclass
class DataSpec:
    name: str
    train: Dataset
    val: Dataset
    num_classes: int  # classes, or the vocabulary of a language model
    input_shape: tuple[int, ...]
    task: str = "classify"  # or "lm": inputs (B, T) token ids, targets (B, T) next tokens

    def example_batch(self, n: int, device: torch.device) -> torch.Tensor:
        """``n`` all-zero inputs of the right shape and dtype (a warm-up forward pass)."""
        dtype = torch.long if self.task == "lm" else torch.float32
        return torch.zeros((n, *self.input_shape), dtype=dtype, device=device)


def _has_split_dirs(root: Path) -> bool:
    return all((root / s).is_dir() and any((root / s).iterdir()) for s in ("train", "val"))


def resolve_dataset(
    name: str, data_path: str | None, imagenette_size: str = "320px", language_model: bool = False
) -> str:
    """``auto`` -> ``text`` for a language model, else ``imagenette`` if it is already under
    ``data_path``, else ``digits``."""
    if name != "auto":
        return name
    if language_model:
        return "text"
    root = Path(data_path or DEFAULT_IMAGE_PATH) / IMAGENETTE_SIZES[imagenette_size]
    return "imagenette" if _has_split_dirs(root) else "digits"


def check_data_args(
    name: str, data_path: str | None, download: bool, imagenette_size: str = "320px"
) -> str | None:
    """An error message for the flags, or None. Cheap: touches only the file system."""
    if name not in DATASETS:
        return f"--dataset must be one of {', '.join(DATASETS)}; got {name!r}"
    if imagenette_size not in IMAGENETTE_SIZES:
        return f"--imagenette_size must be one of {', '.join(IMAGENETTE_SIZES)}; got {imagenette_size!r}"
    if name == "text":
        if data_path is not None and not Path(data_path).exists():
            return f"--data_path {data_path!r}: no such text file or folder"
        return None
    data_path = data_path or DEFAULT_IMAGE_PATH
    root = Path(data_path)
    if name == "folder":
        if not root.is_dir():
            return f"--data_path {data_path!r} does not exist (--dataset folder needs train/ and val/)"
        if not _has_split_dirs(root):
            return f"--data_path {data_path!r} must contain non-empty train/ and val/ class folders"
    if name == "imagenette" and not download:
        sub = root / IMAGENETTE_SIZES[imagenette_size]
        if not _has_split_dirs(sub):
            return (
                f"Imagenette ({imagenette_size}) not found: expected {sub}/train and {sub}/val; "
                "pass --download to fetch it (needs internet) or --dataset digits to run offline"
            )
    return None


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The packaged digits: images ``(1797, 8, 8)`` float in [0, 1] and labels ``(1797,)``."""
    ref = resources.files("lossy_hooks") / "assets" / "digits.csv.gz"
    with ref.open("rb") as raw, gzip.open(raw, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1]).reshape(-1, 8, 8) / 16.0
    labels = torch.from_numpy(table[:, -1]).long()
    return images, labels


def _digits() -> DataSpec:
    images, labels = load_digits()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    val_idx, train_idx = order[:DIGITS_VAL], order[DIGITS_VAL:]
    x = torch.nn.functional.interpolate(
        images[:, None], size=DIGITS_SIZE, mode="bilinear", align_corners=False
    )
    x = x.expand(-1, 3, -1, -1)
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = ((x - mean) / std).contiguous()
    return DataSpec(
        "digits",
        TensorDataset(x[train_idx], labels[train_idx]),
        TensorDataset(x[val_idx], labels[val_idx]),
        10,
        (3, DIGITS_SIZE, DIGITS_SIZE),
    )


def imagenet_transforms() -> tuple[transforms.Compose, transforms.Compose]:
    """The original study's transforms: RandomResizedCrop 224 + flip / Resize 256 + CenterCrop 224."""
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = transforms.Compose(
        [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]
    )
    val = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), norm]
    )
    return train, val


def build_datasets(
    name: str,
    data_path: str | None,
    download: bool = False,
    imagenette_size: str = "320px",
    rank: int = 0,
    block_size: int = 0,
    corpus_mb: float = 1.0,
) -> DataSpec:
    """Build the train/val datasets. With ``--download`` only rank 0 should download (the
    caller puts a barrier around it). ``text`` cuts windows of ``block_size`` tokens (the
    language model's context) from at most ``corpus_mb`` MiB of text."""
    name = resolve_dataset(name, data_path, imagenette_size, language_model=block_size > 0)
    if name == "text":
        if block_size <= 0:
            raise ValueError("--dataset text is for the language models (--model gpt-* or moe-*)")
        train_bytes, val_bytes, corpus = load_corpus(data_path, int(corpus_mb * 2**20))
        try:
            train, val = TokenWindows(train_bytes, block_size), TokenWindows(val_bytes, block_size)
        except ValueError as e:
            raise ValueError(f"--corpus_mb {corpus_mb:g} / --data_path: {e}") from None
        return DataSpec(f"text:{corpus}", train, val, 256, (block_size,), task="lm")
    data_path = data_path or DEFAULT_IMAGE_PATH
    if name == "digits":
        return _digits()
    train_tf, val_tf = imagenet_transforms()
    if name == "fake":
        return DataSpec(
            "fake",
            datasets.FakeData(2048, (3, 224, 224), 10, transform=train_tf_fake(), random_offset=0),
            datasets.FakeData(256, (3, 224, 224), 10, transform=train_tf_fake(), random_offset=10_000),
            10,
            (3, 224, 224),
        )
    if name == "imagenette":
        os.makedirs(data_path, exist_ok=True)
        kw = dict(root=data_path, size=imagenette_size, download=download and rank == 0)
        train = datasets.Imagenette(split="train", transform=train_tf, **kw)
        val = datasets.Imagenette(split="val", transform=val_tf, **kw)
        return DataSpec("imagenette", train, val, len(train.wnids), (3, 224, 224))
    if name == "folder":
        train = datasets.ImageFolder(os.path.join(data_path, "train"), transform=train_tf)
        val = datasets.ImageFolder(os.path.join(data_path, "val"), transform=val_tf)
        if train.classes != val.classes:
            raise ValueError(f"--data_path: train/ and val/ have different classes under {data_path}")
        return DataSpec("folder", train, val, len(train.classes), (3, 224, 224))
    raise ValueError(f"unknown dataset {name!r}")


def train_tf_fake() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

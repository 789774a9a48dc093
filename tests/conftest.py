"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A tiny ImageFolder tree: 3 classes, 6 train and 2 val images each, 24x24 RGB."""
    root = tmp_path_factory.mktemp("folder")
    for split, count in (("train", 6), ("val", 2)):
        for c, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (24, 24), tuple(min(255, v + 7 * i) for v in color)).save(d / f"{i}.png")
    return root

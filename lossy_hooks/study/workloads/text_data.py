"""Byte-level text for the language-model workload (``--dataset text``).

The default corpus needs no download: the ``.py`` sources of the Python standard library
this interpreter runs on (``sysconfig.get_paths()["stdlib"]``, ``site-packages`` left out),
files in sorted order of their relative paths, read until ``--corpus_mb`` MiB. ``--data_path``
instead takes any text file or folder of text files (every file under it that decodes as
UTF-8, sorted). The split is by file, deterministic: every 10th file (positions 9, 19, ...)
is validation, the others training; a single file is split 90/10 by bytes. Each split is one
byte stream (files joined by a newline) cut into windows of ``block_size + 1`` bytes that
start every ``block_size`` bytes (a window's last byte is the next one's first, so every byte
but the first is a target exactly once): inputs ``x = w[:-1]``, next-byte targets
``y = w[1:]``.

Different Python versions ship different standard libraries: the corpus (hence perplexity)
is the same on every machine of one Python version, and ``config.json`` records which one.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = ["VAL_EVERY", "TokenWindows", "corpus_files", "load_corpus", "stdlib_root"]

VAL_EVERY = 10  # every 10th file is validation


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(data_path: str | None) -> list[Path]:
    """The files of the corpus, in order: the standard library's ``.py`` files (``None``),
    ``data_path`` itself (a file), or every regular file under it (a folder)."""
    if data_path is None:
        root = stdlib_root()
        return sorted(
            (p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts),
            key=lambda p: p.relative_to(root).as_posix(),
        )
    path = Path(data_path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(
            (p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()
        )
    raise ValueError(f"--data_path {data_path!r}: no such text file or folder")


def _text(path: Path) -> bytes | None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def load_corpus(data_path: str | None, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(train, val, name)``: the two byte streams (uint8 tensors) and a name for the run
    (``stdlib-py3.11`` or the data path's name). Reads at most ``max_bytes`` of text."""
    files = corpus_files(data_path)
    parts: list[bytes] = []
    total = 0
    for f in files:
        if total >= max_bytes:
            break
        data = _text(f)
        if data:
            data = data[: max_bytes - total]
            parts.append(data)
            total += len(data)
    if not parts:
        raise ValueError(f"--data_path {data_path!r}: no UTF-8 text found")
    if len(parts) == 1:
        cut = len(parts[0]) * 9 // 10
        train, val = parts[0][:cut], parts[0][cut:]
    else:
        train = b"\n".join(p for i, p in enumerate(parts) if i % VAL_EVERY != VAL_EVERY - 1)
        val = b"\n".join(p for i, p in enumerate(parts) if i % VAL_EVERY == VAL_EVERY - 1)
        if not val:  # fewer than VAL_EVERY files: the last one is validation
            train, val = b"\n".join(parts[:-1]), parts[-1]
    name = (
        f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}" if data_path is None else Path(data_path).name
    )
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train), as_tensor(val), name


class TokenWindows(Dataset):
    """Windows of ``block_size + 1`` bytes of a stream, one every ``block_size`` bytes
    (consecutive windows overlap by one byte): item ``i`` is ``(x, y)`` with
    ``x = s[i b : i b + b]`` and ``y = s[i b + 1 : i b + b + 1]`` (int64)."""

    def __init__(self, stream: torch.Tensor, block_size: int) -> None:
        if len(stream) < block_size + 1:
            raise ValueError(
                f"the text ({len(stream)} bytes) is shorter than one window ({block_size + 1} bytes)"
            )
        self.stream, self.block = stream, block_size

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.block

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        w = self.stream[i * self.block : i * self.block + self.block + 1].long()
        return w[:-1], w[1:]

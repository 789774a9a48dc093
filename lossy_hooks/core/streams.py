"""Random streams of loss masks: one generator per ``(seed, stream, rank)``, so every rank
draws its own worker masks, shared post masks are the same on every rank, and a resumed run
continues each sequence where its checkpoint left it."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from lossy_hooks.loss_models import LossModel

__all__ = ["DropSite", "derive_seed"]

# Random streams: one seed per (run seed, stream, rank).
STREAM_WORKER, STREAM_POST_SHARED, STREAM_POST_INDEPENDENT = 1, 2, 3
# The random signs of encoding="hadamard": one stream, the same on every rank.
STREAM_ROTATION = 4
# Seeds of the start offsets of deterministic models: (seed, stream + this, rank).
STREAM_START_OFFSET = 100


def derive_seed(seed: int, stream: int, rank: int = 0) -> int:
    """A 63-bit generator seed for ``(seed, stream, rank)`` (numpy's SeedSequence hash)."""
    state = np.random.SeedSequence([int(seed), int(stream), int(rank)]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


class DropSite:
    """One random stream of loss masks: a copy of the loss model (its memory) and the
    generator for ``(seed, stream, rank)``. The worker and post drop points have one each;
    ``counts_transport="regenerate"`` replays one per other rank."""

    def __init__(self, name: str, model: LossModel, stream: int, per_rank: bool) -> None:
        self.name = name
        self.model = model
        self.lossless = model.is_lossless()
        self.stream = stream
        self.per_rank = per_rank
        self.generator: torch.Generator | None = None
        self._saved_generator: tuple[str, torch.Tensor] | None = None

    def prepare(self, device: torch.device, seed: int, rank: int) -> None:
        if self.generator is not None and self.generator.device == device:
            return
        stream_rank = rank if self.per_rank else 0
        gen = torch.Generator(device=device)
        gen.manual_seed(derive_seed(seed, self.stream, stream_rank))
        saved = self._saved_generator
        if self.generator is None and saved is None:  # a fresh stream (not a resume)
            # deterministic models (traces) start at an offset of their own per stream
            self.model.start_stream(derive_seed(seed, self.stream + STREAM_START_OFFSET, stream_rank))
        if saved is not None:
            if saved[0] == device.type:
                gen.set_state(saved[1])
            else:
                warnings.warn(
                    f"{self.name} drop generator state was saved on {saved[0]!r} and is resumed "
                    f"on {device.type!r}: the loss sequence restarts from the seed",
                    stacklevel=3,
                )
            self._saved_generator = None
        self.generator = gen

    def draw(self, num_packets: int) -> torch.Tensor | None:
        """The loss mask of ``num_packets`` packets (``None`` when the model is lossless)."""
        if self.lossless:
            return None
        assert self.generator is not None
        return self.model.sample(num_packets, self.generator)

    def state_dict(self) -> dict[str, Any]:
        gen = self._saved_generator
        if self.generator is not None:
            gen = (self.generator.device.type, self.generator.get_state())
        return {"model": self.model.state_dict(), "generator": gen}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd["model"])
        self.generator = None
        gen = sd["generator"]
        # a checkpoint loaded with map_location="cuda" moves the state tensor to the GPU;
        # Generator.set_state takes a CPU ByteTensor
        self._saved_generator = None if gen is None else (str(gen[0]), gen[1].detach().cpu().clone())

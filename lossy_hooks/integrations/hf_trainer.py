"""Hugging Face ``Trainer``: :func:`register` adds a callback that registers the lossy hook
on the Trainer's DDP module once the Trainer has wrapped the model (``on_train_begin``;
the wrapped model is ``trainer.model_wrapped``, which callbacks are not given), and checks
after the first optimizer step that buckets reached the state::

    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=...)
    state = LossyState(loss_rate=0.05, mtu=1500)
    lossy_hooks.integrations.hf_trainer.register(trainer, state)
    trainer.train()

Launch with ``torchrun --nproc_per_node=N`` (2 or more processes: one process is not
wrapped in DDP). Around the hook: ``gradient_accumulation_steps=k`` accumulates under
``no_sync`` (Accelerate's ``accumulate``), so the hook fires once per optimizer step;
``fp16``/``bf16`` autocast the forward pass, buckets keep the parameters' dtype;
``ddp_bucket_cap_mb`` sets the buckets.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from lossy_hooks.core.state import LossyState
from lossy_hooks.integrations import check_hook_reached, register_on_ddp

__all__ = ["LossyTrainerCallback", "register"]


class LossyTrainerCallback(TrainerCallback):
    """The callback :func:`register` adds (it keeps a reference to its Trainer)."""

    def __init__(self, trainer: Any, state: LossyState) -> None:
        self.trainer = trainer
        self.state = state
        self._registered_on: Any = None
        self._checked = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = self.trainer.model_wrapped
        if model is not self._registered_on:  # a second train() reuses the wrapped model
            register_on_ddp(model, self.state, "Hugging Face Trainer")
            self._registered_on = model

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._checked:
            self._checked = True
            check_hook_reached(self.state, "Hugging Face Trainer")


def register(trainer: Any, state: LossyState) -> LossyTrainerCallback:
    """Add the callback that registers the lossy hook on ``trainer``'s DDP module."""
    callback = LossyTrainerCallback(trainer, state)
    trainer.add_callback(callback)
    return callback

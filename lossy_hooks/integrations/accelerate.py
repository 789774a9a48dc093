"""Hugging Face Accelerate: register the lossy hook on what ``accelerator.prepare`` returned::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = LossyState(loss_rate=0.05, mtu=1500)
    lossy_hooks.integrations.accelerate.register(model, state)

``accelerator.prepare`` wraps the model in ``DistributedDataParallel`` when it runs on two
or more processes (``accelerate launch`` or ``torchrun``); with one process it returns the
model unwrapped and :func:`register` says so. Around the hook: inside
``accelerator.accumulate(model)`` the backward passes of non-final micro-batches run under
``no_sync``, so the hook fires once per ``gradient_accumulation_steps`` micro-batches (once
per optimizer step); ``mixed_precision="fp16"/"bf16"`` autocasts the forward pass, and the
buckets keep the parameters' dtype (fp32); ``DistributedDataParallelKwargs(bucket_cap_mb=...)``
sets the buckets. Accelerate's own ``comm_hook`` option takes only PyTorch's built-in hooks.
Call :func:`check` after the first optimizer step to be sure buckets arrive.
"""

from __future__ import annotations

from typing import Any

from lossy_hooks.core.state import LossyState
from lossy_hooks.integrations import check_hook_reached, register_on_ddp

__all__ = ["check", "register"]


def register(prepared_model: Any, state: LossyState) -> Any:
    """Register the lossy hook on the DDP module ``accelerator.prepare`` returned; returns it."""
    return register_on_ddp(prepared_model, state, "Accelerate")


def check(state: LossyState) -> None:
    """Raise if no bucket reached ``state`` (call after the first optimizer step)."""
    check_hook_reached(state, "Accelerate")

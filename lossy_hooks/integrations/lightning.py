"""PyTorch Lightning: ``LossyHookCallback`` registers the lossy hook on the strategy's DDP
module on every device.

Why not ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)``: Lightning (2.6) registers
comm hooks only when the root device is CUDA, so on CPUs that code trains normally and loses
nothing, silently. The callback registers itself (on any device) and checks after the first
optimizer step that buckets reached the state::

    state = LossyState(loss_rate=0.05, mtu=1500)
    trainer = L.Trainer(strategy="ddp", callbacks=[LossyHookCallback(state)], ...)
    trainer.fit(model)

Around the hook: ``accumulate_grad_batches=k`` runs the first ``k - 1`` backward passes
under ``no_sync``, so the hook fires once per optimizer step; ``precision="16-mixed"`` /
``"bf16-mixed"`` autocast the forward pass while gradients (and buckets) keep the
parameters' dtype; ``DDPStrategy(bucket_cap_mb=...)`` sets the buckets as in plain DDP.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from lossy_hooks.core.state import LossyState
from lossy_hooks.integrations import check_hook_reached, register_on_ddp

__all__ = ["LossyHookCallback"]


class LossyHookCallback(Callback):
    """Registers :func:`~lossy_hooks.lossy_allreduce_hook` with ``state`` when training
    starts, and raises :class:`~lossy_hooks.integrations.HookNotReachedError` if no bucket
    reached it by the end of the first optimizer step."""

    def __init__(self, state: LossyState) -> None:
        self.state = state
        self._registered_on: Any = None
        self._checked = False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        model = trainer.strategy.model
        if model is self._registered_on:  # a second fit() on the same wrapped model
            return
        if getattr(trainer.strategy, "_ddp_comm_hook", None) is not None:
            raise ValueError(
                "LossyHookCallback: the DDPStrategy already has ddp_comm_hook set; pass the "
                "LossyState to the callback only (Lightning registers strategy hooks on CUDA only)"
            )
        register_on_ddp(model, self.state, "Lightning")
        self._registered_on = model

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._checked and trainer.global_step >= 1:
            self._checked = True
            check_hook_reached(self.state, "Lightning")

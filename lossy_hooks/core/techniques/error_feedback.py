r"""``error_feedback=True``: what a worker's uplink lost is sent again with its next gradient.

Rank ``r`` sends ``c_t = g_t + e_{t-1}`` (``e``: what its uplink lost last time for this
bucket, ``0`` at first) and keeps ``e_t = c_t`` on the packets lost now (``0`` elsewhere), so
after ``T`` steps what arrived plus ``e_T`` is exactly ``sum_t g_t``: no gradient is lost, it
is late. A packet holding a non-finite element (an overflow a ``GradScaler`` will skip) is
not kept. The residuals live in the bucket records (``BucketRecord.residual``), move with
the parameters when DDP rebuilds its buckets, and are saved in checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lossy_hooks.core.techniques.base import BucketCall, Technique

if TYPE_CHECKING:
    from lossy_hooks.core.buckets import BucketRecord
    from lossy_hooks.core.options import LossConfig

__all__ = ["ErrorFeedback", "feed_back_"]


def feed_back_(record: BucketRecord, buf: torch.Tensor, lost: torch.Tensor) -> None:
    """``buf <- buf + e`` and ``e <- buf`` on the packets of ``lost`` whose elements are all
    finite, ``0`` elsewhere (in place; the record's residual created at the first call)."""
    if record.residual is None:
        record.residual = torch.zeros_like(buf)
    else:
        buf.add_(record.residual)
    # select the lost packets of c (a non-finite one is not kept: selection, so inf never
    # becomes nan in the other packets)
    record.residual.zero_()
    record.layout.fill_from_(record.residual, lost & record.layout.finite_packets(buf), buf)


class ErrorFeedback(Technique):
    """Error feedback on the worker uplink (see the module)."""

    name = "error_feedback"

    @classmethod
    def used_by(cls, config: LossConfig) -> bool:
        return config.error_feedback

    @classmethod
    def refuses(cls, config: LossConfig) -> str | None:
        if not config.drops_before:
            return (
                "error_feedback resends what a worker's uplink lost: it needs drop_point='worker' or "
                f"'both', got {config.drop_point!r}"
            )
        if config.fill != "zero":
            return (
                "error_feedback needs fill='zero' (rescale already compensates the loss in expectation; "
                f"both together count it twice), got fill={config.fill!r}"
            )
        if config.encoding == "hadamard":
            return "error_feedback with encoding='hadamard' is not supported (residuals would need a decode)"
        return None

    def before_wire(self, call: BucketCall, x: torch.Tensor) -> torch.Tensor:
        if call.lost is not None:
            feed_back_(call.record, x, call.lost)
        return x

"""The dtype packets carry (as PyTorch's ``fp16_compress_hook`` / ``bf16_compress_hook``).

``wire_dtype="fp32"`` sends the bucket in its own dtype (no conversion); ``"fp16"`` and
``"bf16"`` send a copy in that dtype and widen the result back into where it lands (DDP's
buffer, a reduce-scatter's output; a rotated bucket: back to the rotation's dtype, before it
is decoded). The per-packet factors of the
fills are applied before the cast (:class:`~lossy_hooks.core.techniques.fills.Fill` comes
earlier in the chain), so ``1/(1-p)`` and ``W/c_j`` are not rounded to the wire dtype (in
bf16 a bias of up to 0.2%).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lossy_hooks.core.techniques.base import BucketCall, Technique

if TYPE_CHECKING:
    from lossy_hooks.core.options import LossConfig

__all__ = ["WIRE_DTYPES", "WireDtype", "wire_dtype_of"]

WIRE_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def wire_dtype_of(name: str, bucket_dtype: torch.dtype) -> torch.dtype:
    """The dtype packets carry: ``"fp32"`` means the bucket's own dtype (no conversion)."""
    return WIRE_DTYPES[name] or bucket_dtype


class WireDtype(Technique):
    """Cast what travels to the wire dtype; widen the result back. In every chain: with
    ``"fp32"`` it casts only a rotated bucket of a narrower dtype (back to the bucket's)."""

    name = "wire_dtype"

    @classmethod
    def used_by(cls, config: LossConfig) -> bool:
        return True

    def before_wire(self, call: BucketCall, x: torch.Tensor) -> torch.Tensor:
        dtype = call.state.wire_dtype_for(call.bucket)
        if x.dtype == dtype:
            return x
        into_result = x is call.bucket  # nothing else changed it: the result lands in call.result
        call.memo[self.name] = (x.dtype, into_result)
        if into_result:
            call.keep_alive(call.result)
        return x.to(dtype)

    def after_collective(self, call: BucketCall, out: torch.Tensor) -> torch.Tensor:
        if self.name not in call.memo:
            return out
        dtype, into_result = call.memo[self.name]
        assert call.result is not None
        return call.result.copy_(out) if into_result else out.to(dtype)

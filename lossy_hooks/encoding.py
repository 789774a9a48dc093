r"""What travels on the wire instead of the bucket: a randomized Hadamard rotation of it
(OptiReduce's idea: a lost packet becomes small noise spread over a block instead of a hole),
and a narrower wire dtype (as PyTorch's ``fp16_compress_hook`` / ``bf16_compress_hook``).

**Hadamard.** A bucket of ``N`` elements is cut into blocks of ``B = 2^b`` elements (``B`` is
``hadamard_block``, or the next power of two >= ``N`` for a smaller bucket), the last block
zero-padded, so ``N_p = B * ceil(N / B)`` elements travel (the padding is counted in the
packets sent). Each block ``x`` is sent as ``y = H_B D x / sqrt(B)``, with ``H_B`` the
Sylvester-Hadamard matrix (entries ±1) and ``D`` a diagonal of random signs drawn from one
generator that every rank seeds alike (``(seed, stream 4)``) and advances alike, once per
bucket call: so ``D`` is shared by all ranks and new at every step. ``Q = H_B / sqrt(B)`` is
symmetric and orthogonal (``Q Q = I``), so the receiver computes ``x = D Q y`` (``D D = I``).

- Linear: ``sum_r Q D g_r = Q D sum_r g_r``, so the collective's sum decodes to the sum; at
  loss 0 the result equals the lossless one up to fp32 round-off: each stage of the transform
  and of its inverse sums ``r <= 64`` products per element, so the relative error is of order
  ``sqrt(r) 2^-24`` per stage (tested: relative L2 < ``4 b * 2^-24``, ``b = log2 B``).
- Unbiased with ``fill="rescale"``: rescaling is unbiased packet by packet in the rotated
  domain, and the decoder is linear.
- A lost packet of ``k`` coefficients removes ``k`` of ``B`` orthogonal components: the error
  it causes, ``D Q e`` with ``e`` the lost coefficients, spreads over all ``B`` elements of its
  block with ``|error_i| <= |e|_1 / sqrt(B)`` instead of wiping ``k`` elements out.

The transform (:func:`fwht`) is a mixed-radix fast Walsh–Hadamard transform: ``H_B`` is the
Kronecker product of ``64 x 64`` (and smaller) Sylvester factors, each applied to one axis
of a view of the blocks by a matmul, so a 4096-element block costs two passes over the data
(a radix-2 butterfly costs twelve). No ``B x B`` matrix is formed.
"""

from __future__ import annotations

import torch

__all__ = ["ENCODINGS", "WIRE_DTYPES", "block_size", "decode_", "encode", "fwht", "wire_dtype_of"]

ENCODINGS = ("none", "hadamard")
WIRE_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def wire_dtype_of(name: str, bucket_dtype: torch.dtype) -> torch.dtype:
    """The dtype packets carry: ``"fp32"`` means the bucket's own dtype (no conversion)."""
    return WIRE_DTYPES[name] or bucket_dtype


def block_size(numel: int, block: int) -> int:
    """``B`` for a bucket of ``numel`` elements: ``block``, or the next power of two >= ``numel``
    when that is smaller (a small bucket is not padded to a large block)."""
    return min(block, 1 << max(numel - 1, 0).bit_length())


RADIX = 64  # elements of the dense Hadamard factor applied per stage
_FACTORS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _factor(r: int, device: torch.device) -> torch.Tensor:
    """``H_r / sqrt(r)`` (Sylvester, fp32) on ``device``, built once."""
    h = _FACTORS.get((r, device))
    if h is None:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < r:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        h = _FACTORS[(r, device)] = (h / r**0.5).float().to(device)
    return h


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard transform of each row of ``x`` (``(m, B)`` fp32, ``B`` a
    power of two), as a new tensor.

    ``H_B = H_{r_1} ⊗ ... ⊗ H_{r_k}`` with radices ``r_i <= 64``: each stage multiplies one
    axis of the ``(m, ..., r_i, ...)`` view by the ``r_i x r_i`` factor (one matmul, ±1/sqrt(r)
    entries), so ``B = 4096`` takes two passes over the data instead of the twelve of a radix-2
    butterfly: ``O(N (r_1 + ... + r_k))`` multiply-adds, done by the matmul kernels.
    On CUDA with TF32 matmuls enabled (``torch.backends.cuda.matmul.allow_tf32``) the stages
    round to TF32 (about ``1e-3`` relative); PyTorch's default keeps fp32."""
    m, b = x.shape
    stride = 1
    while stride < b:
        r = min(RADIX, b // stride)
        h = _factor(r, x.device)
        if stride == 1:
            x = (x.reshape(-1, r) @ h).view(m, b)
        else:
            x = torch.matmul(h, x.reshape(-1, r, stride)).view(m, b)
        stride *= r
    return x


def _signs(numel: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A vector of random ±1 (fp32)."""
    bits = torch.randint(0, 2, (numel,), generator=generator, device=device, dtype=torch.float32)
    return bits.mul_(2).sub_(1)


def encode(flat: torch.Tensor, block: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, D)``: the rotated, zero-padded fp32 copy of ``flat`` (``N_p`` elements) and the
    sign vector used (keep it for :func:`decode_`)."""
    n = flat.numel()
    b = block_size(n, block)
    padded = -(-n // b) * b
    signs = _signs(padded, generator, flat.device)
    x = torch.empty(padded, dtype=torch.float32, device=flat.device)
    torch.mul(flat, signs[:n], out=x[:n])  # D x, in the copy to fp32
    x[n:].zero_()
    return fwht(x.view(-1, b)).view(-1), signs


def decode_(out: torch.Tensor, y: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """``out <- (D Q y)[:N]`` (``out`` has the bucket's ``N`` elements and dtype)."""
    b = block_size(out.numel(), block)
    x = fwht(y.float().view(-1, b)).view(-1)[: out.numel()]
    if out.dtype == torch.float32:
        return torch.mul(x, signs[: out.numel()], out=out)
    return out.copy_(x.mul_(signs[: out.numel()]))

r"""``encoding="hadamard"``: what travels instead of the bucket is a randomized Hadamard
rotation of it (OptiReduce's idea: a lost packet becomes small noise spread over a block
instead of a hole). :class:`HadamardEncoding` is the technique; the functions are its math.

**Hadamard.** A bucket of ``N`` elements is cut into ``floor(N / B)`` blocks of ``B = 2^b``
elements (``B`` is ``hadamard_block``) and, when ``B`` does not divide ``N``, the rest
``R = N mod B`` into tail blocks, one per set bit of ``R`` rounded up to a multiple of
``M = min(B, 1024)`` (largest first: ``R = 189,280`` gives ``2^17 + 2^15 + 2^14 + 2^13 +
2^10``); a rest of at most ``M`` elements is one block of the next power of two. Blocks are
zero-padded: ``N_p`` elements travel (:func:`padded_numel`; the padding, fewer than ``M``
elements per bucket, is counted in the packets sent). Each block ``x`` is sent as
``y = H D x / sqrt(len x)``, with
``H`` the Sylvester-Hadamard matrix (entries ±1) and ``D`` a diagonal of random signs drawn
from one generator that every rank seeds alike (``(seed, stream 4)``) and advances alike, once
per bucket call: so ``D`` is shared by all ranks and new at every step. ``Q = H / sqrt(len)``
is symmetric and orthogonal (``Q Q = I``), so the receiver computes ``x = D Q y``
(``D D = I``). The rotation is computed in fp32 (fp64 for an fp64 bucket).

- Linear: ``sum_r Q D g_r = Q D sum_r g_r``, so the collective's sum decodes to the sum; at
  loss 0 the result equals the lossless one up to round-off: each stage of the transform
  and of its inverse sums ``r <= 64`` products per element, so the relative error is of order
  ``sqrt(r) eps`` per stage (tested: relative L2 < ``4 b eps``, ``eps = 2^-24`` in fp32).
- Unbiased with ``fill="rescale"``: rescaling is unbiased packet by packet in the rotated
  domain, and the decoder is linear.
- A lost packet of ``k`` coefficients removes ``k`` of ``B`` orthogonal components: the error
  it causes, ``D Q e`` with ``e`` the lost coefficients, spreads over all ``B`` elements of its
  block with ``|error_i| <= |e|_1 / sqrt(B)`` instead of wiping ``k`` elements out. With
  coefficients of variance ``s^2`` and a fraction ``f`` of a block's coefficients lost, each
  element of that block is off by about ``N(0, f s^2)``; the worst element of the bucket is
  set by the worst block's ``f``. A block must therefore hold many loss bursts for ``f`` to
  stay near the long-run loss rate: the default ``B = 2^18`` (1 MiB of fp32, ~700 packets of
  1500 B) holds ~9 bursts of 4 packets at 5% loss (docs/semantics.md has the measured error
  per block size and burst length, docs/performance.md the CPU cost). The tail blocks are
  smaller and spread less, but hold fewer than ``B`` of the bucket's elements; one block of
  the next power of two for the whole rest would spread it better and pad up to ``B / 2``
  elements (87% of a 140k-element bucket's size), bytes a time study would pay for.

**The transform** (:func:`fwht_`) is a mixed-radix fast Walsh–Hadamard transform: ``H_B`` is
the Kronecker product of ``64 x 64`` (and smaller) Sylvester factors, each applied to one axis
of a view of the blocks by a matmul (``O(N (r_1 + ... + r_k))`` multiply-adds, done by the
matmul kernels), each stage written into the other of two buffers (ping-pong: no allocation
per stage, which on CPU costs page faults worth half the transform). No ``B x B`` matrix is
formed. **The signs** are bits: ``ceil(N_p / 32)`` random int32 words per call (32 signs a
draw) are expanded into sign-bit masks and XOR-ed into the floats' sign bits (no multiply, no
float per sign); the words are what is kept for decoding.
"""

from __future__ import annotations

import bisect
import sys
from typing import TYPE_CHECKING

import torch

from lossy_hooks.core.techniques.base import BucketCall, Technique

if TYPE_CHECKING:
    from lossy_hooks.core.options import LossConfig

__all__ = [
    "DEFAULT_HADAMARD_BLOCK",
    "ENCODINGS",
    "TAIL_GRANULE",
    "HadamardEncoding",
    "block_edges",
    "block_groups",
    "carrying_packets",
    "decode_",
    "encode",
    "fwht",
    "fwht_",
    "padded_numel",
    "rotation_dtype",
]

ENCODINGS = ("none", "hadamard")
DEFAULT_HADAMARD_BLOCK = 1 << 18  # elements; see the module docs for why


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


TAIL_GRANULE = 1024  # M: the rest of a bucket is padded to a multiple of min(B, M)


def block_groups(numel: int, block: int) -> list[tuple[int, int]]:
    """The blocks of a bucket of ``numel`` elements, in order, as ``(size, count)`` groups:
    ``floor(N / B)`` of ``B``, then one tail block per set bit of the rest rounded up to a
    multiple of ``min(B, M)`` (a rest of at most that: one block of its next power of two)."""
    full, rest = divmod(numel, block)
    groups = [(block, full)] if full else []
    granule = min(block, TAIL_GRANULE)
    if 0 < rest <= granule:
        groups.append((_next_power_of_two(rest), 1))
    elif rest:
        rounded = -(-rest // granule) * granule
        groups += [(1 << k, 1) for k in range(rounded.bit_length() - 1, -1, -1) if rounded >> k & 1]
    return groups


def block_edges(numel: int, block: int) -> tuple[int, ...]:
    """``(0, e_1, ..., N_p)``: where each block of :func:`block_groups` ends."""
    edges = [0]
    for size, count in block_groups(numel, block):
        edges += [edges[-1] + size * (i + 1) for i in range(count)]
    return tuple(edges)


def carrying_packets(
    start: int, stop: int, packet_numel: int, num_packets: int, edges: tuple[int, ...] = ()
) -> tuple[int, int]:
    """``(first, last)``: the packets that carry elements ``[start, stop)`` of a bucket: with
    an encoding (``edges`` from :func:`block_edges`) every packet of every block holding one of
    them (a lost coefficient anywhere in a block changes all of its elements)."""
    if edges:
        start = edges[bisect.bisect_right(edges, start) - 1]
        stop = edges[bisect.bisect_left(edges, stop)]
    return start // packet_numel, min((stop - 1) // packet_numel, num_packets - 1)


def _total(groups: list[tuple[int, int]]) -> int:
    return sum(size * count for size, count in groups)


def padded_numel(numel: int, block: int) -> int:
    """``N_p``: the elements that travel for a bucket of ``numel`` (its blocks' sizes summed)."""
    return _total(block_groups(numel, block))


RADIX = 64  # elements of the dense Hadamard factor applied per stage
_FACTORS: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
_SHIFTS: dict[torch.device, torch.Tensor] = {}
_SIGN_BIT = -(2**31)


def _factor(r: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``H_r / sqrt(r)`` (Sylvester) in ``dtype`` on ``device``, built once."""
    h = _FACTORS.get((r, device, dtype))
    if h is None:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < r:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        h = _FACTORS[(r, device, dtype)] = (h / r**0.5).to(device=device, dtype=dtype)
    return h


def fwht_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard transform of each row of ``x`` (``(m, B)`` fp32 or fp64,
    contiguous, ``B`` a power of two), computed by ping-pong between ``x`` and ``scratch``
    (same shape and dtype; both overwritten): returns the one that holds the result.

    ``H_B = H_{r_1} ⊗ ... ⊗ H_{r_k}`` with radices ``r_i <= 64``: stage ``i`` multiplies
    axis ``i`` of the ``(m, ..., r_i, ...)`` view by the ``r_i x r_i`` factor (one matmul,
    ±1/sqrt(r) entries), so ``B = 2^18`` takes three passes over the data instead of the 18 of
    a radix-2 butterfly. On CUDA with TF32 matmuls enabled
    (``torch.backends.cuda.matmul.allow_tf32``) the stages round to TF32 (about ``1e-3``
    relative); PyTorch's default keeps fp32."""
    m, b = x.shape
    src, dst = x.view(-1), scratch.view(-1)
    stride = 1
    while stride < b:
        r = min(RADIX, b // stride)
        h = _factor(r, x.device, x.dtype)
        if stride == 1:
            torch.mm(src.view(-1, r), h, out=dst.view(-1, r))
        else:
            torch.matmul(h, src.view(-1, r, stride), out=dst.view(-1, r, stride))
        src, dst = dst, src
        stride *= r
    return src.view(m, b)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """:func:`fwht_` of each row of ``x`` as a new tensor (``x`` untouched)."""
    return fwht_(x.clone(), torch.empty_like(x))


def _transform(x: torch.Tensor, scratch: torch.Tensor, groups: list[tuple[int, int]]) -> torch.Tensor:
    """:func:`fwht_` of every block of every row of ``x`` (``(m, N_p)``, the blocks of
    :func:`block_groups` in each row; one call per group): the buffer, ``x`` or ``scratch``,
    that holds the whole result (the first group's; a later group whose stage count has the
    other parity is copied into it). A group that is not contiguous across rows (``m > 1``
    rows of several groups) is transformed in a copy and written back into ``x``."""
    rows = x.shape[0]
    home = None
    start = 0
    for size, count in groups:
        end = start + size * count
        seg, spare = x[:, start:end], scratch[:, start:end]
        if seg.is_contiguous():
            done = fwht_(seg.view(rows * count, size), spare.view(rows * count, size))
            if home is None:
                home = x if done.data_ptr() == x.data_ptr() else scratch
            elif done.data_ptr() != home[:, start:end].data_ptr():  # the other stage parity: one copy
                home[:, start:end].copy_(done.view(rows, -1))
        else:
            blocks = seg.contiguous().view(rows * count, size)  # a copy: the rows' blocks side by side
            done = fwht_(blocks, torch.empty_like(blocks))
            home = x if home is None else home
            home[:, start:end].copy_(done.view(rows, -1))
        start = end
    assert home is not None
    return home


def _sign_bits(x: torch.Tensor) -> torch.Tensor:
    """The int32 words of ``x`` that hold its elements' sign bits (fp32: the element itself;
    fp64: its high word, the second of the two on a little-endian machine), as a view to XOR
    into."""
    words = x.view(torch.int32)
    if x.dtype == torch.float32:
        return words
    assert sys.byteorder == "little", "fp64 sign bits are located for little-endian machines"
    return words.view(-1, 2)[:, 1]


def _sign_words(numel: int, generator: torch.Generator, device: torch.device, rows: int = 1) -> torch.Tensor:
    """``(rows, ceil(numel / 32))`` random int32 words, drawn in one call: bit ``i`` of word
    ``w`` of a row is the sign of element ``32 w + i`` of that row (1: negative)."""
    words = torch.empty(rows, -(-numel // 32), dtype=torch.int32, device=device)
    return words.random_(-(2**31), 2**31, generator=generator)


def _flip_signs_(x: torch.Tensor, words: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
    """``x <- D x`` in place, ``x`` of shape ``(m, N)`` and ``words`` ``(m, ceil(N / 32))``:
    XOR each element's sign bit with its bit of its row's words; the expanded masks are built
    in ``scratch`` (as int32) when it is given and fits."""
    shifts = _SHIFTS.get(x.device)
    if shifts is None:
        shifts = _SHIFTS[x.device] = 31 - torch.arange(32, dtype=torch.int32, device=x.device)
    rows, n = x.shape
    k = words.shape[-1]
    target = _sign_bits(x.view(-1)).view(rows, n)
    room = None if scratch is None else scratch.view(torch.int32).view(-1)
    if room is not None and n % 32 == 0 and room.numel() >= rows * n:
        into = room[: rows * n].view(rows, k, 32)
        masks = torch.bitwise_left_shift(words.view(rows, k, 1), shifts, out=into)
    else:
        masks = words.view(rows, k, 1) << shifts
    target.bitwise_xor_(masks.bitwise_and_(_SIGN_BIT).view(rows, k * 32)[:, :n])


def rotation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the rotation is computed in for a bucket of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def encode(
    flat: torch.Tensor, block: int, generator: torch.Generator, rows: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, words)``: the rotated, zero-padded copy of ``flat`` (``N_p`` elements, fp32; fp64
    for an fp64 bucket) and the sign words used (keep them for :func:`decode_`). With
    ``rows > 1`` (a reduce-scatter's rows, each bound for another rank) each row of
    ``N = flat.numel() / rows`` elements is rotated on its own: ``y`` is ``(rows, N_p)`` and
    ``words`` ``(rows, ceil(N_p / 32))``, row ``j``'s signs in row ``j`` (one draw for all)."""
    n = flat.numel() // rows
    groups = block_groups(n, block)
    padded = _total(groups)
    words = _sign_words(padded, generator, flat.device, rows)
    x = torch.empty(rows, padded, dtype=rotation_dtype(flat.dtype), device=flat.device)
    x[:, :n].copy_(flat.view(rows, n))
    x[:, n:].zero_()
    scratch = torch.empty_like(x)
    _flip_signs_(x, words, scratch)  # D x
    y = _transform(x, scratch, groups)
    return (y[0], words[0]) if rows == 1 else (y, words)


def decode_(out: torch.Tensor, y: torch.Tensor, words: torch.Tensor, block: int) -> torch.Tensor:
    """``out <- (D Q y)[:N]`` (``out`` has the bucket's ``N`` elements and dtype; ``y`` the
    ``N_p`` received coefficients, overwritten; ``words`` the signs of this row)."""
    n = out.numel()
    y = y if y.dtype == rotation_dtype(out.dtype) else y.to(rotation_dtype(out.dtype))
    y = y.view(1, -1)
    scratch = torch.empty_like(y)
    x = _transform(y, scratch, block_groups(n, block))
    _flip_signs_(x, words.view(1, -1), scratch if x is y else y)  # D (Q y)
    return out.copy_(x.view(-1)[:n])


class HadamardEncoding(Technique):
    """Rotate this rank's copy before the wire (``y = Q D g``, the bucket zero-padded to its
    blocks; a reduce-scatter's rows each on its own), decode the summed result where it lands
    (``D Q y``: DDP's buffer, a reduce-scatter's output with its row's signs). The packets are
    those of the padded rotation (``BucketRecords`` lays them out)."""

    name = "hadamard"

    @classmethod
    def used_by(cls, config: LossConfig) -> bool:
        return config.encoding == cls.name

    @classmethod
    def refuses(cls, config: LossConfig) -> str | None:
        if config.packetization == "tensor":
            return "encoding='hadamard' needs packetization='mtu' (rotated packets have no tensors)"
        if config.fill == "stale":
            return (
                "encoding='hadamard' cannot use fill='stale': the rotation is new at every step, so a "
                "previous step's packet is not comparable"
            )
        return None

    def before_wire(self, call: BucketCall, x: torch.Tensor) -> torch.Tensor:
        generator = call.state.rotation.generator
        assert generator is not None
        y, signs = encode(x, self.config.hadamard_block, generator, call.rows)
        call.memo[self.name] = signs if call.rows == 1 else signs[call.row]
        call.keep_alive(signs, call.result)
        return y

    def after_collective(self, call: BucketCall, out: torch.Tensor) -> torch.Tensor:
        assert call.result is not None
        return decode_(call.result, out, call.memo[self.name], self.config.hadamard_block)

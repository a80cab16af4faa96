"""Activation rows as pairs of fp16 values, for the fp16 tensor-core kernel (:mod:`.hmma`).

:mod:`.hmma` multiplies weight integers (exact in fp16) with activations on
fp16 tensor cores and accumulates in float32 over a whole 256-column block.
One fp16 value keeps 11 bits of an activation, about 2.4e-4 of relative
error: too much for the library's 1e-4.  So every activation is the sum of
two fp16 values, ``hi = fp16(x')`` and ``lo = fp16(x' - hi)`` (22 bits), and
the kernel runs each product twice.  ``x' = x / s`` with a power of two
``s`` per row, chosen so that ``max |x'|`` lies in ``[2**12, 2**13)``: far
from fp16's overflow (65504) and from its subnormals; dividing by ``s`` is
exact and the kernel multiplies its results by ``s``.

Layout, per row of ``K`` values (``K`` a multiple of 256)::

    hx   uint32 [K]      16-column group g, words 16g + 4i .. 16g + 4i + 3 (i = 0..3):
                         hi(p), hi(q), lo(p), lo(q) with p = columns 4i and
                         4i + 2 of the group, q = columns 4i + 1 and 4i + 3
                         (the lower column in the low half)
    hsum uint32 [K / 32] 256-column block b: words 8b + 2i, 8b + 2i + 1 the hi
                         and lo halves of S'[8b + 2i], S'[8b + 2i + 1]
    xs   float32 [1]     s

with ``S'[j] = sum(x'[32j : 32j + 32]) / 32`` (the column sums that the
offsets of Q4_K weights multiply; the 1/32 keeps them inside fp16).  The
column order inside a word is the order in which :mod:`.hmma` unpacks four
weight values of one 32-bit word: lane ``i`` of a quad reads columns
``4i .. 4i + 3`` of a step.

A row holding a NaN or an infinity gets ``s = 1`` (its values pass through
as fp16, so the outputs it touches come out non-finite, as on the float
path).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, float64, int32, int64, uint32

from .primitives import as_f32, half2_f32, load4, pack_half2, seg_sum, store4, warp_max64

__all__ = ["split_sizes", "launch_split", "split_reference", "TARGET_EXP"]

#: ``max |x / s|`` lies in ``[2**TARGET_EXP, 2**(TARGET_EXP + 1))``.
TARGET_EXP = 12
# warps of a block (one row a block: a warp a row left the GPU idle at
# T=64, 16 blocks for the 64 rows of x)
_WARPS = 4


def split_sizes(rows: int, cols: int):
    """``(hx words, hsum words, xs floats)`` of ``rows`` rows of ``cols``
    activations (``cols`` a multiple of 256)."""
    return rows * cols, rows * cols // 32, rows


@cuda.jit(device=True)
def _split4(v0, v1, v2, v3):
    """hi and lo words ``(p_hi, q_hi, p_lo, q_lo)`` of four consecutive
    scaled values: p holds values 0 and 2, q values 1 and 3."""
    p = pack_half2(v0, v2)
    q = pack_half2(v1, v3)
    h0, h2 = half2_f32(p)
    h1, h3 = half2_f32(q)
    return p, q, pack_half2(v0 - h0, v2 - h2), pack_half2(v1 - h1, v3 - h3)


@cuda.jit
def _split_kernel(x, rows, cols, hx, hsum, xs):
    """Block ``b`` splits row ``b`` (``cols`` values of the flat ``x``): warp
    ``w`` takes the 128-column chunks ``w, w + _WARPS, ...``, lane ``l``
    columns ``128 c + 4 l .. + 3`` of chunk ``c``."""
    lane = cuda.threadIdx.x & 31
    warp = cuda.threadIdx.x >> 5
    row = cuda.blockIdx.x
    base = int64(row) * cols
    chunks = cols >> 7
    amax = float32(0)
    for c in range(warp, chunks, _WARPS):
        v0, v1, v2, v3 = load4(x, base + 128 * c + 4 * lane)
        for v in (v0, v1, v2, v3):
            a = abs(v)
            # a NaN counts as an infinity: either way the row keeps s = 1
            if a != a:
                a = math.inf
            amax = max(amax, a)
    wmax = cuda.shared.array(_WARPS, float32)
    amax = float32(warp_max64(float64(amax)))
    if lane == 0:
        wmax[warp] = amax
    cuda.syncthreads()
    for w in range(_WARPS):
        amax = max(amax, wmax[w])
    inv = float32(1)
    s = float32(1)
    if amax > 0 and amax < math.inf:
        e = max(-126, int32(math.floor(math.log2(float64(amax)))) - TARGET_EXP)
        s = as_f32(uint32((e + 127) << 23))
        inv = as_f32(uint32((127 - e) << 23))
    if cuda.threadIdx.x == 0:
        xs[row] = s
    # hx word k of a row holds column k's value: the layout keeps a lane's four
    # columns in its own four words
    for c0 in range(0, chunks, _WARPS):
        # every warp makes the same rounds (the simulator's sums are
        # block-wide): past the last chunk it redoes it and stores nothing
        live = c0 + warp < chunks
        c = min(c0 + warp, chunks - 1)
        o = base + 128 * c + 4 * lane
        v0, v1, v2, v3 = load4(x, o)
        v0 *= inv
        v1 *= inv
        v2 *= inv
        v3 *= inv
        if live:
            store4(hx, o, *_split4(v0, v1, v2, v3))
        # 32-column sums S'[4c + j] (j = lane >> 3): half-warp 0 gets j = 0, 1,
        # half-warp 1 j = 2, 3, each in the pair of a block word
        q = (v0 + v1) + (v2 + v3)
        odd = (lane >> 3) & 1
        s0 = seg_sum(q if odd == 0 else float32(0), 16) * float32(1 / 32)
        s1 = seg_sum(q if odd == 1 else float32(0), 16) * float32(1 / 32)
        if live and lane & 15 == 0:
            w = pack_half2(s0, s1)
            h0, h1 = half2_f32(w)
            # block c >> 1, word pair 2 (c & 1) + (lane >> 4)
            ow = (int64(row) * (cols >> 8) + (c >> 1)) * 8 + 4 * (c & 1) + 2 * (lane >> 4)
            hsum[ow] = w
            hsum[ow + 1] = pack_half2(s0 - h0, s1 - h1)


def launch_split(x, rows: int, cols: int, hx, hsum, xs, stream) -> None:
    """Enqueue the split of ``rows`` rows of ``cols`` values of the flat
    device float32 ``x`` into ``hx``, ``hsum``, ``xs`` (sizes from
    :func:`split_sizes`; no checks, no allocation)."""
    if rows:
        _split_kernel[rows, 32 * _WARPS, stream](x, rows, cols, hx, hsum, xs)


def split_reference(x: np.ndarray):
    """numpy twin of the split (see the module docstring).

    Parameters
    ----------
    x : float32 (rows, K), K a multiple of 256

    Returns
    -------
    hx : uint32 (rows, K)
    sums : float32 (rows, K // 32)
        ``S'`` as float32 (the kernel stores them as hi/lo fp16 pairs).
    xs : float32 (rows,)
    """
    x = np.asarray(x, np.float32)
    rows, cols = x.shape
    amax = np.abs(x).max(axis=1)
    finite = np.isfinite(amax) & (amax > 0)
    e = np.where(finite, np.maximum(-126, np.floor(np.log2(np.where(finite, amax, 1.0)))
                                    - TARGET_EXP), 0).astype(np.int64)
    xs = np.ldexp(np.float32(1), e).astype(np.float32)
    xp = x * np.ldexp(np.float32(1), -e).astype(np.float32)[:, None]
    hi = xp.astype(np.float16)
    with np.errstate(invalid="ignore"):
        # inf - inf: NaN in the lo half of an infinite value, as on the device
        lo = (xp - hi.astype(np.float32)).astype(np.float16)
    quad = lambda h: h.reshape(rows, -1, 4, 4)  # noqa: E731  [row, group, i, column in quad]
    # [row, group, i, hi/lo, p/q, half]
    words = np.empty((rows, cols // 16, 4, 2, 2, 2), np.float16)
    for half, h in ((0, hi), (1, lo)):
        q = quad(h)
        words[:, :, :, half, 0, :] = q[..., [0, 2]]
        words[:, :, :, half, 1, :] = q[..., [1, 3]]
    hx = words.reshape(rows, cols * 2).view(np.uint32)
    sums = xp.reshape(rows, -1, 32).sum(axis=2, dtype=np.float32) / np.float32(32)
    return hx, sums.astype(np.float32), xs

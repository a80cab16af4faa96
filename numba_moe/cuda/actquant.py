"""Activation rows as 16-bit integer codes, for the ``dp4a`` GEMV (:mod:`.qgemv`)
and the tensor-core kernel (:mod:`.mma`).

The GEMV multiplies small integer weight codes with integer activation codes
four at a time (``dp4a``: four signed byte products and a sum in one
instruction), which is what keeps a decode step memory-bound instead of
bound by unpacking.  Eight-bit activations would cost about 1e-2 of
relative error; so each activation gets a 16-bit code split over two
signed bytes, and the GEMV runs ``dp4a`` twice (``256 * hi + lo``).

Every 32 consecutive columns share a scale (so that the tensor-core kernel
can take 32 columns per ``mma``)::

    d = max|x[32h : 32h + 32]| / 32639
    q = rint(x / d)                    in [-32639, 32639]
    q = 256 * hi + lo                  hi, lo signed bytes, lo in [-128, 127]

so ``|x - d q| <= d / 2``: about 1.5e-5 of the largest of the 32 values.
They are stored by *groups* of 16 columns (the weight segments of every
quantized type lie inside one group); group ``g`` of a row is::

    xq uint32 [8]:   words 0..3  hi bytes of columns 16g + 4w + i (byte i of word w)
                     words 4..7  lo bytes, same order
    xa float32 [12]: d, s, r, 0  over the group's 16 columns, then over its
                     first 8 columns, then over its last 8 (d repeated)

with ``s = sum(x)`` and ``r = sum(x - d q)`` (the rounding left in the
codes).  ``s`` serves the weights' offsets (``sum((a w - b) x) = a sum(w x)
- b s``); ``r`` lets the GEMV treat the weight codes as centred on ``c``,
which halves the error of the integer products, at no integer cost::

    sum(w x) ~ d sum(w q) + c r        (exact when the error is spread evenly)

32 columns holding a NaN or an infinity get all-zero codes and ``d =
max|x|`` (NaN or inf), so the rows they touch come out non-finite, as the
float path would.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, int32, int64, uint32

from .primitives import load4, pair_max

__all__ = ["GROUP", "CODE_MAX", "quantized_sizes", "quantize_groups", "launch_quantize",
           "quantize_reference"]

#: Columns per activation group.
GROUP = 16
#: Largest code magnitude: 127 * 256 + 127, so that hi and lo are signed bytes.
CODE_MAX = 32639
_THREADS = 128


def quantized_sizes(values: int):
    """``(xq words, xa floats)`` of the quantized form of ``values``
    activations (a multiple of 32)."""
    groups = values // GROUP
    return groups * 8, groups * 12


@cuda.jit(device=True)
def _amax16(x, base):
    """max |x[base : base + 16]|; NaN if one of them is NaN."""
    amax = float32(0)
    for k in range(4):
        v0, v1, v2, v3 = load4(x, base + 4 * k)
        for v in (v0, v1, v2, v3):
            a = abs(v)
            # a NaN sticks: nothing compares greater than it
            if a > amax or a != a:
                amax = a
    return amax


@cuda.jit(device=True)
def _quantize_group(x, i, amax, xq, xa):
    """Quantize group ``i`` of the flat ``x`` with scale ``amax / CODE_MAX``."""
    base = int64(i) * 16
    v = cuda.local.array(16, float32)
    for k in range(4):
        v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3] = load4(x, base + 4 * k)
    usable = amax > 0 and amax < math.inf
    inv = float32(CODE_MAX) / amax if usable else float32(0)
    d = amax / float32(CODE_MAX) if usable else amax
    s_lo = float32(0)
    s_hi = float32(0)
    r_lo = float32(0)
    r_hi = float32(0)
    for w in range(4):
        hw = uint32(0)
        lw = uint32(0)
        for b in range(4):
            xv = v[4 * w + b]
            q = int32(math.floor(xv * inv + float32(0.5))) if usable else int32(0)
            q = max(-CODE_MAX, min(CODE_MAX, q))
            lo = ((q + 128) & 255) - 128
            hi = (q - lo) >> 8
            hw |= uint32(hi & 255) << uint32(8 * b)
            lw |= uint32(lo & 255) << uint32(8 * b)
            r = xv - d * float32(q) if usable else float32(0)
            if w < 2:
                s_lo += xv
                r_lo += r
            else:
                s_hi += xv
                r_hi += r
        xq[8 * int64(i) + w] = hw
        xq[8 * int64(i) + 4 + w] = lw
    o = 12 * int64(i)
    xa[o] = d
    xa[o + 1] = s_lo + s_hi
    xa[o + 2] = r_lo + r_hi
    xa[o + 3] = float32(0)
    xa[o + 4] = d
    xa[o + 5] = s_lo
    xa[o + 6] = r_lo
    xa[o + 7] = float32(0)
    xa[o + 8] = d
    xa[o + 9] = s_hi
    xa[o + 10] = r_hi
    xa[o + 11] = float32(0)


@cuda.jit(device=True)
def quantize_groups(x, first, stride, n_groups, xq, xa):
    """Groups ``first, first + stride, ...`` of the flat ``x`` quantized by the
    calling thread (a grid-stride loop, ``stride`` even); threads ``2k``
    and ``2k + 1`` agree on their pair's scale.  Every thread makes the same
    number of rounds (the simulator's exchange is block-wide): past the end
    it redoes the last pair and stores nothing."""
    for base in range(0, n_groups, stride):
        i = base + first
        g = min(i, n_groups - 2 + (i & 1))
        amax = pair_max(_amax16(x, int64(g) * 16))
        if i < n_groups:
            _quantize_group(x, g, amax, xq, xa)


@cuda.jit
def _quantize_kernel(x, n_groups, xq, xa):
    """Thread ``i`` quantizes group ``i`` of the flat ``x``."""
    quantize_groups(x, cuda.grid(1), cuda.gridsize(1), n_groups, xq, xa)


def launch_quantize(x, values: int, xq, xa, stream) -> None:
    """Quantize the first ``values`` activations of the flat device array
    ``x`` (float32, a multiple of 32, 16-byte aligned) into ``xq`` (uint32)
    and ``xa`` (float32) of :func:`quantized_sizes`; no checks, no
    allocation."""
    n_groups = values // GROUP
    if n_groups:
        _quantize_kernel[-(-n_groups // _THREADS), _THREADS, stream](x, n_groups, xq, xa)


def quantize_reference(x: np.ndarray):
    """The codes of :func:`launch_quantize` in numpy (for tests).

    Parameters
    ----------
    x : float32 [n * GROUP], finite, ``n`` even

    Returns
    -------
    (q int32 [n * GROUP], d float32 [n])
        ``x ~= d[g] * q`` on group ``g``.
    """
    g = x.reshape(-1, GROUP)
    amax = np.abs(x).reshape(-1, 2 * GROUP).max(axis=1).repeat(2)
    inv = np.where(amax > 0, np.float32(CODE_MAX) / np.where(amax > 0, amax, 1), 0)
    q = np.floor(g * inv[:, None].astype(np.float32) + np.float32(0.5)).astype(np.int32)
    return np.clip(q, -CODE_MAX, CODE_MAX).reshape(-1), (amax / np.float32(CODE_MAX)).astype(
        np.float32)

"""Quantize activation rows for the integer dot products.

The CPU kernels quantize activations the way ggml's ``quantize_row_q8_K_ref``
does, but to 12 bits instead of 8: per block of 256 values (the last block
of a row may be shorter, a multiple of 32), find the element of largest
magnitude ``max`` (keeping its sign), ``iscale = -2047 / max``,
``q = clamp(nearest_int(iscale * x), -2047, 2047)`` stored as int16,
``d = 1 / iscale``.  Alongside we keep ``d * sum(q)`` over every 32 values
(ggml keeps the integer ``bsums`` per 16), which the Q4_K/Q5_K min
correction multiplies by ``dmin * m``.

Why 12 bits: the int16 x int16 products need no more room (see
:mod:`numba_moe.cpu.rowdot` for the overflow bound), and the error is 16x
below ggml's 8-bit Q8_K: a layer output matches float64 to about 1e-3 of
its magnitude, against about 1e-2 with 8 bits.

Non-finite input: a block holding NaN or +-Inf gets ``d = NaN`` (and NaN
sub-block sums), so every output that reads it is NaN rather than silently
finite.  An all-zero block gets ``d = 0``.
"""
import numpy as np
from numba import njit, prange

from ..errors import MoEError
from ..quants.floatbits import nearest_int
from ..threading_guard import parallel_launch

__all__ = ["QMAX", "quantize_rows", "quantize_row_into", "quantize_rows_into"]

#: Largest activation code; ``iscale = -QMAX / max``.
QMAX = 2047


@njit(inline="always", cache=True)
def quantize_row_into(x, q, d, mb):
    """Quantize one float32 row.

    Parameters
    ----------
    x : float32 [C], C a multiple of 32
    q : int16 [C]
        Receives the codes.
    d : float32 [ceil(C / 256)]
        Receives the block scales.
    mb : float32 [C / 32]
        Receives ``d * sum(q)`` of every 32 values.
    """
    n = x.shape[0]
    nblk = (n + 255) // 256
    for b in range(nblk):
        lo = b * 256
        m = min(256, n - lo)
        amax = np.float32(0.0)
        vmax = np.float32(0.0)
        finite = True
        for i in range(m):
            v = x[lo + i]
            a = abs(v)
            if not a <= np.float32(3.4028235e38):
                finite = False
            if a > amax:
                amax = a
                vmax = v
        if not finite or amax == np.float32(0.0):
            fill = np.float32(0.0) if finite else np.float32(np.nan)
            d[b] = fill
            for i in range(m):
                q[lo + i] = np.int16(0)
            for s in range(m // 32):
                mb[b * 8 + s] = fill
            continue
        iscale = np.float32(-QMAX) / vmax
        dd = np.float32(1.0) / iscale
        d[b] = dd
        for s in range(m // 32):
            tot = np.int32(0)
            for i in range(32):
                v = nearest_int(iscale * x[lo + s * 32 + i])
                v = min(max(v, np.int32(-QMAX)), np.int32(QMAX))
                q[lo + s * 32 + i] = np.int16(v)
                tot += v
            mb[b * 8 + s] = dd * np.float32(tot)


# Below this many values a parallel launch costs more than it saves (and on
# a shared machine it waits for a second core): quantize on the caller's thread.
SERIAL_MAX_VALUES = 1 << 16


@njit(inline="always", cache=True)
def _quantize_rows_loop(x, n, q, d, mb):
    for r in prange(n):
        quantize_row_into(x[r], q[r], d[r], mb[r])


@njit(parallel=True, cache=True)
def _quantize_rows_parallel(x, n, q, d, mb):
    _quantize_rows_loop(x, n, q, d, mb)


@njit(cache=True)
def _quantize_rows_serial(x, n, q, d, mb):
    _quantize_rows_loop(x, n, q, d, mb)


def quantize_rows_into(x, n, q, d, mb):
    """Rows ``0 .. n-1`` of ``x`` into ``q``, ``d``, ``mb`` (no validation;
    one thread below :data:`SERIAL_MAX_VALUES` values, all threads above)."""
    if n * x.shape[1] <= SERIAL_MAX_VALUES:
        _quantize_rows_serial(x, n, q, d, mb)
    else:
        with parallel_launch():
            _quantize_rows_parallel(x, n, q, d, mb)


def quantize_rows(x, n=None, out=None):
    """Quantize the first ``n`` rows of ``x`` per 256-value block (12-bit codes).

    Parameters
    ----------
    x : ndarray of float32, shape (R, C), C-contiguous; C a multiple of 32
    n : int, optional
        Rows to quantize (default all ``R``).
    out : tuple of ndarrays, optional
        ``(q, d, mb)`` to fill: int16 (>= n, C), float32 (>= n, ceil(C/256)),
        float32 (>= n, C/32), all C-contiguous.  Allocated when omitted.

    Returns
    -------
    (q, d, mb)
        Codes, block scales, and scaled 32-value sums (see the module
        docstring); rows past ``n`` are left untouched.

    Raises
    ------
    MoEError
        Wrong dtype, shape, layout, or ``C`` not a multiple of 32.
    """
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2
            and x.flags.c_contiguous):
        raise MoEError("x: expected a C-contiguous float32 array [R, C]")
    rows, cols = x.shape
    if cols % 32:
        raise MoEError(f"x: row length {cols} is not a multiple of 32")
    n = rows if n is None else int(n)
    if not 0 <= n <= rows:
        raise MoEError(f"n={n}: expected 0 <= n <= {rows}")
    shapes = ((cols,), ((cols + 255) // 256,), (cols // 32,))
    dtypes = (np.int16, np.float32, np.float32)
    if out is None:
        out = tuple(np.empty((n,) + s, dtype=t) for s, t in zip(shapes, dtypes))
    else:
        for name, a, s, t in zip(("q", "d", "mb"), out, shapes, dtypes):
            if not (isinstance(a, np.ndarray) and a.dtype == t and a.ndim == 2
                    and a.shape[0] >= n and a.shape[1:] == s and a.flags.c_contiguous):
                raise MoEError(f"out[{name}]: expected a C-contiguous {np.dtype(t).name} "
                               f"array [>= {n}, {s[0]}]")
    if n:
        quantize_rows_into(x, n, *out)
    return out

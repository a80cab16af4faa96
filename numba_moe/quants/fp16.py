"""IEEE half -> float32 decoding usable inside ``@njit`` code.

Numba has no ``np.float16`` in nopython mode, and the scales of every
k-quant block are fp16.  :func:`f16_to_f32` decodes one value with exact
integer/power-of-two arithmetic (so results are bit-identical to
``np.float16(...).astype(np.float32)`` for every finite value, and give
+-inf / NaN where numpy does).
"""
import numpy as np
from numba import njit

__all__ = ["f16_to_f32", "f16_bytes_to_f32"]

_INF = np.float32(np.inf)
_NAN = np.float32(np.nan)
# 2**(exp - 25) for every normal exponent field value: a table lookup instead
# of a float64 pow per decode (Q8_0 decodes one fp16 per 32 values).
_POW2 = np.array([2.0 ** (e - 25) for e in range(32)], dtype=np.float32)


@njit(inline="always", cache=True)
def f16_to_f32(h):
    """Decode the half-precision bit pattern ``h`` (any int, low 16 bits used).

    Layout::

        bit 15   14..10     9..0
            sign exponent   mantissa

    Subnormals are ``mant * 2**-24``; normals ``(1024 + mant) * 2**(exp - 25)``.
    Both products are exact in float32.
    """
    h = np.int32(h) & np.int32(0xFFFF)
    mant = h & np.int32(0x3FF)
    exp = (h >> np.int32(10)) & np.int32(0x1F)
    if exp == 0:
        v = np.float32(mant) * np.float32(5.960464477539063e-08)  # 2**-24
    elif exp == 31:
        v = _INF if mant == 0 else _NAN
    else:
        v = np.float32(mant + np.int32(1024)) * _POW2[exp]
    if h & np.int32(0x8000):
        v = -v
    return v


@njit(inline="always", cache=True)
def f16_bytes_to_f32(lo, hi):
    """Decode a little-endian fp16 stored as two bytes ``lo``, ``hi``."""
    return f16_to_f32(np.int32(lo) | (np.int32(hi) << np.int32(8)))

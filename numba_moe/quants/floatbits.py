"""Bit-level float32 helpers for ``@njit`` code: the exact tricks ggml's C
quantizers use, so the Numba ports produce the same bytes.

* :func:`f32_bits` reinterprets a float32 as its int32 bit pattern (an LLVM
  ``bitcast``; Numba has no scalar ``view``).
* :func:`nearest_int` is ggml's ``nearest_int``: add ``1.5 * 2**23`` in
  float32 and read the low mantissa bits.  For ``|x| <= 4194303`` that is
  round-half-to-even; beyond it the C code returns garbage, and so does this
  port (the same garbage), which keeps byte-identity even for absurd inputs.
* :func:`f32_to_f16_bits` is IEEE round-to-nearest-even float32 -> half, as
  ``GGML_FP32_TO_FP16`` (F16C ``vcvtps2ph`` or ggml's portable fallback) and
  ``numpy.float16`` both do.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["f32_bits", "nearest_int", "f32_to_f16_bits"]

_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23


@intrinsic
def _bitcast_f32_i32(typingctx, x):
    if x != types.float32:
        return None
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(inline="always", cache=True)
def f32_bits(x):
    """Bit pattern of ``np.float32(x)`` as an int32."""
    return _bitcast_f32_i32(np.float32(x))


@njit(inline="always", cache=True)
def nearest_int(fval):
    """ggml's ``nearest_int(float)``: the magic-number rounding, bit for bit."""
    i = f32_bits(np.float32(fval) + _MAGIC)
    return (i & np.int32(0x007FFFFF)) - np.int32(0x00400000)


@njit(inline="always", cache=True)
def f32_to_f16_bits(x):
    """Half-precision bit pattern (0..65535, int32) nearest to float32 ``x``.

    Ties round to even; magnitudes from 65520 up become +-inf; NaN becomes
    the quiet NaN ``0x7E00`` with the input's sign.

    Layout of the float32 input ``a = bits & 0x7FFFFFFF``::

        bit 31  30..23    22..0
            s   exponent  mantissa (implicit leading 1 when exponent > 0)
    """
    bits = f32_bits(x)
    sign = (bits >> np.int32(16)) & np.int32(0x8000)
    a = bits & np.int32(0x7FFFFFFF)
    if a > np.int32(0x7F800000):
        return sign | np.int32(0x7E00)
    if a >= np.int32(0x477FF000):  # >= 65520: rounds past the largest half
        return sign | np.int32(0x7C00)
    if a >= np.int32(0x38800000):  # >= 2**-14: a normal half
        # Rebias the exponent (127 -> 15) and drop 13 mantissa bits.
        h = (a >> np.int32(13)) - np.int32(112 << 10)
        rem = a & np.int32(0x1FFF)
        if rem > np.int32(0x1000) or (rem == np.int32(0x1000) and (h & np.int32(1)) != 0):
            h += np.int32(1)
        return sign | h
    # A half subnormal (or zero): count units of 2**-24 with the implicit bit
    # restored; a float32 of exponent e holds mant * 2**(e - 150).
    e = a >> np.int32(23)
    if e < np.int32(102):  # below 2**-25: rounds to zero
        return sign
    mant = (a & np.int32(0x7FFFFF)) | np.int32(0x800000)
    shift = np.int32(126) - e  # 14..24
    h = mant >> shift
    rem = mant & ((np.int32(1) << shift) - np.int32(1))
    half = np.int32(1) << (shift - np.int32(1))
    if rem > half or (rem == half and (h & np.int32(1)) != 0):
        h += np.int32(1)
    return sign | h

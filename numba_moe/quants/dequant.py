"""Block dequantization: native Numba kernels for Q4_K, Q5_K, Q6_K, Q8_0 and a
``gguf.quants`` fallback for every other GGML type.

The native kernels are bit-exact with ``gguf.quants.dequantize`` on any bytes,
including scales that decode to inf/NaN.  That needs the same float32
operation order as gguf-py: the sub-block factors ``d * sc`` and ``dmin * m``
are rounded to float32 first, then ``d_sc * q - dm_m`` is evaluated as a
rounded product followed by a rounded subtraction.  Numba (without
``fastmath``) never contracts that into an FMA, so the order holds.

Three layers per type:

* ``dequant_block_<type>(blk, out)``: decode ONE block, ``blk`` a 1-D uint8
  view of the block's bytes, ``out`` a 1-D float32 view of its values.
  Exported: other kernels use them as reference decoders.
* ``_dequant_<type>_blocks(blocks, out)``: ``prange`` over a 2-D block array.
* :func:`dequantize`: validation, allocation, dispatch.
"""
import warnings

import gguf
import numpy as np
from numba import njit, prange

from ..errors import MoEError
from ..threading_guard import parallel_launch
from .fp16 import f16_bytes_to_f32
from .qtypes import NATIVE_TYPES, as_qtype, block_geometry

__all__ = [
    "dequantize",
    "dequant_block_q4_k",
    "dequant_block_q5_k",
    "dequant_block_q6_k",
    "dequant_block_q8_0",
]

_T = gguf.GGMLQuantizationType

# Types already warned about on the gguf fallback path (one warning each).
_FALLBACK_WARNED = set()


@njit(inline="always", cache=True)
def _scale_min_k4(scales_at, blk, j):
    """6-bit (scale, min) of sub-block ``j`` (0..7) from the 12 bytes at
    ``blk[scales_at:]``, as uint8.

    Layout (gguf-py's letters: a..h scales, A..H mins of sub-blocks 0..7)::

        byte  0 EEaaaaaa   byte  4 FFAAAAAA...   byte  8 EEEEeeee
        byte  1 ffbbbbbb   byte  5 ...           byte  9 FFFFffff
        byte  2 ggcccccc   byte  6 ...           byte 10 GGGGgggg
        byte  3 hhdddddd   byte  7 HHDDDDDD      byte 11 HHHHhhhh

    i.e. for j < 4: scale = byte[j] & 63, min = byte[j+4] & 63; for j >= 4
    the low 4 bits sit in byte[j+4] (scale low nibble, min high nibble) and
    the top 2 bits in bits 7..6 of byte[j-4] (scale) and byte[j] (min).
    """
    s = scales_at
    if j < 4:
        sc = blk[s + j] & np.uint8(63)
        mn = blk[s + j + 4] & np.uint8(63)
    else:
        sc = (blk[s + j + 4] & np.uint8(0x0F)) | ((blk[s + j - 4] >> np.uint8(6)) << np.uint8(4))
        mn = (blk[s + j + 4] >> np.uint8(4)) | ((blk[s + j] >> np.uint8(6)) << np.uint8(4))
    return sc, mn


@njit(cache=True)
def dequant_block_q4_k(blk, out):
    """Decode one Q4_K block.

    Parameters
    ----------
    blk : uint8[144]
        ``d`` fp16 @0, ``dmin`` fp16 @2, ``scales[12]`` @4, ``qs[128]`` @16.
    out : float32[256]
        Receives ``(d * sc[s]) * q - (dmin * m[s])`` for sub-block ``s``.
    """
    d = f16_bytes_to_f32(blk[0], blk[1])
    dmin = f16_bytes_to_f32(blk[2], blk[3])
    # Sub-blocks 2c and 2c+1 (32 values each) share the 32 bytes qs[32c:32c+32]:
    #
    #   qs[32c + l]  bits 7..4 -> value 64c + 32 + l   (sub-block 2c + 1)
    #                bits 3..0 -> value 64c + l        (sub-block 2c)
    for c in range(4):
        sc0, mn0 = _scale_min_k4(4, blk, 2 * c)
        sc1, mn1 = _scale_min_k4(4, blk, 2 * c + 1)
        d0 = d * np.float32(sc0)
        m0 = dmin * np.float32(mn0)
        d1 = d * np.float32(sc1)
        m1 = dmin * np.float32(mn1)
        q_at = 16 + 32 * c
        o_at = 64 * c
        for l in range(32):
            q = blk[q_at + l]
            out[o_at + l] = d0 * np.float32(q & np.uint8(0x0F)) - m0
            out[o_at + 32 + l] = d1 * np.float32(q >> np.uint8(4)) - m1


@njit(cache=True)
def dequant_block_q5_k(blk, out):
    """Decode one Q5_K block.

    Parameters
    ----------
    blk : uint8[176]
        ``d`` fp16 @0, ``dmin`` fp16 @2, ``scales[12]`` @4 (as Q4_K),
        ``qh[32]`` @16, ``qs[128]`` @48.
    out : float32[256]
        Receives ``(d * sc[s]) * q - (dmin * m[s])``, ``q`` in 0..31.
    """
    d = f16_bytes_to_f32(blk[0], blk[1])
    dmin = f16_bytes_to_f32(blk[2], blk[3])
    # Low 4 bits as in Q4_K; the 5th bit of sub-block s is bit s of qh[l]:
    #
    #   qs[32c + l]  bits 7..4 -> low bits of value 64c + 32 + l
    #                bits 3..0 -> low bits of value 64c + l
    #   qh[l]        bit 2c + 1 -> bit 4 of value 64c + 32 + l
    #                bit 2c     -> bit 4 of value 64c + l
    for c in range(4):
        sc0, mn0 = _scale_min_k4(4, blk, 2 * c)
        sc1, mn1 = _scale_min_k4(4, blk, 2 * c + 1)
        d0 = d * np.float32(sc0)
        m0 = dmin * np.float32(mn0)
        d1 = d * np.float32(sc1)
        m1 = dmin * np.float32(mn1)
        sh0 = np.uint8(2 * c)
        sh1 = np.uint8(2 * c + 1)
        q_at = 48 + 32 * c
        o_at = 64 * c
        for l in range(32):
            q = blk[q_at + l]
            h = blk[16 + l]
            lo = (q & np.uint8(0x0F)) | (((h >> sh0) & np.uint8(1)) << np.uint8(4))
            hi = (q >> np.uint8(4)) | (((h >> sh1) & np.uint8(1)) << np.uint8(4))
            out[o_at + l] = d0 * np.float32(lo) - m0
            out[o_at + 32 + l] = d1 * np.float32(hi) - m1


@njit(cache=True)
def dequant_block_q6_k(blk, out):
    """Decode one Q6_K block.

    Parameters
    ----------
    blk : uint8[210]
        ``ql[128]`` @0, ``qh[64]`` @128, ``scales`` int8[16] @192,
        ``d`` fp16 @208.
    out : float32[256]
        Receives ``(d * scales[v // 16]) * (q - 32)``, ``q`` in 0..63.
    """
    d = f16_bytes_to_f32(blk[208], blk[209])
    # Two halves h = 0, 1 of 128 values; with l = 0..31 and H = qh[32h + l]:
    #
    #   value 128h +      l : ql[64h +      l] bits 3..0 | (H bits 1..0) << 4
    #   value 128h + 32 + l : ql[64h + 32 + l] bits 3..0 | (H bits 3..2) << 4
    #   value 128h + 64 + l : ql[64h +      l] bits 7..4 | (H bits 5..4) << 4
    #   value 128h + 96 + l : ql[64h + 32 + l] bits 7..4 | (H bits 7..6) << 4
    for h in range(2):
        for k in range(4):
            v_at = 128 * h + 32 * k
            # The 32 values of (h, k) span two 16-value scale groups.
            da = d * np.float32(np.int8(blk[192 + v_at // 16]))
            db = d * np.float32(np.int8(blk[192 + v_at // 16 + 1]))
            ql_at = 64 * h + 32 * (k & 1)
            ql_sh = np.uint8(4 * (k >> 1))
            qh_sh = np.uint8(2 * k)
            for l in range(32):
                lo = (blk[ql_at + l] >> ql_sh) & np.uint8(0x0F)
                hi = (blk[128 + 32 * h + l] >> qh_sh) & np.uint8(0x03)
                q = np.int8(lo | (hi << np.uint8(4))) - np.int8(32)
                ds = da if l < 16 else db
                out[v_at + l] = ds * np.float32(q)


@njit(cache=True)
def dequant_block_q8_0(blk, out):
    """Decode one Q8_0 block.

    Parameters
    ----------
    blk : uint8[34]
        ``d`` fp16 @0, ``qs`` int8[32] @2.
    out : float32[32]
        Receives ``q * d``.
    """
    d = f16_bytes_to_f32(blk[0], blk[1])
    for l in range(32):
        out[l] = np.float32(np.int8(blk[2 + l])) * d


@njit(parallel=True, cache=True)
def _dequant_q4_k_blocks(blocks, out):
    for i in prange(blocks.shape[0]):
        dequant_block_q4_k(blocks[i], out[i])


@njit(parallel=True, cache=True)
def _dequant_q5_k_blocks(blocks, out):
    for i in prange(blocks.shape[0]):
        dequant_block_q5_k(blocks[i], out[i])


@njit(parallel=True, cache=True)
def _dequant_q6_k_blocks(blocks, out):
    for i in prange(blocks.shape[0]):
        dequant_block_q6_k(blocks[i], out[i])


@njit(parallel=True, cache=True)
def _dequant_q8_0_blocks(blocks, out):
    for i in prange(blocks.shape[0]):
        dequant_block_q8_0(blocks[i], out[i])


_NATIVE_DRIVERS = {
    _T.Q4_K: _dequant_q4_k_blocks,
    _T.Q5_K: _dequant_q5_k_blocks,
    _T.Q6_K: _dequant_q6_k_blocks,
    _T.Q8_0: _dequant_q8_0_blocks,
}
assert set(_NATIVE_DRIVERS) == set(NATIVE_TYPES)


def _check_blocks(data, qt, block_bytes):
    """Validate a quantized byte array; return it C-contiguous."""
    if not isinstance(data, np.ndarray):
        raise MoEError(f"data: expected a numpy uint8 array of {qt.name} blocks, got {type(data).__name__}")
    if data.dtype != np.uint8:
        raise MoEError(f"data: expected dtype uint8 (raw {qt.name} block bytes), got {data.dtype}")
    if data.ndim < 1:
        raise MoEError("data: expected at least 1 dimension (row bytes last), got a 0-d array")
    if data.shape[-1] % block_bytes:
        raise MoEError(
            f"data: last axis has {data.shape[-1]} bytes, not a multiple of the "
            f"{qt.name} block size of {block_bytes} bytes"
        )
    # The kernels index raw memory: strided inputs (e.g. a column slice) are
    # copied once here rather than handled in the hot loop.
    return np.ascontiguousarray(data)


def dequantize(data, qtype):
    """Decode GGML blocks to float32, like ``gguf.quants.dequantize``.

    Parameters
    ----------
    data : numpy.ndarray of uint8, shape (..., row_bytes)
        Raw blocks; the last axis holds whole blocks of one row. A
        non-contiguous array is copied to a contiguous one first.
    qtype : GGMLQuantizationType or str
        Block type, e.g. ``"Q4_K"``.

    Returns
    -------
    numpy.ndarray of float32, shape (..., row_bytes // block_bytes * block_values)
        A new array; for F32 a float32 view of ``data``.

    Raises
    ------
    MoEError
        Unknown type, wrong dtype, a last axis that is not whole blocks, or a
        type that neither this module nor gguf can decode.

    Notes
    -----
    Q4_K, Q5_K, Q6_K and Q8_0 run native Numba kernels, bit-exact with gguf.
    Every other type goes through ``gguf.quants.dequantize`` (vectorized
    numpy, several times slower), with one ``UserWarning`` per type and
    process.
    """
    qt = as_qtype(qtype)
    if qt == _T.F32:
        return _check_blocks(data, qt, 4).view(np.float32)
    block_values, block_bytes = block_geometry(qt)
    blocks = _check_blocks(data, qt, block_bytes)
    out_shape = blocks.shape[:-1] + (blocks.shape[-1] // block_bytes * block_values,)
    driver = _NATIVE_DRIVERS.get(qt)
    if driver is None:
        return _dequantize_fallback(blocks, qt, out_shape)
    out = np.empty(out_shape, dtype=np.float32)
    if out.size:
        with parallel_launch():
            driver(blocks.reshape(-1, block_bytes), out.reshape(-1, block_values))
    return out


def _dequantize_fallback(blocks, qt, out_shape):
    try:
        # inf/NaN scales decode to inf/NaN silently, as on the native path.
        with np.errstate(all="ignore"):
            out = gguf.quants.dequantize(blocks, qt)
    except NotImplementedError as exc:
        raise MoEError(f"qtype: {qt.name} cannot be dequantized (gguf.quants: {exc})") from None
    if qt not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(qt)
        warnings.warn(
            f"numba_moe.quants: no native kernel for {qt.name}; dequantized through "
            f"gguf.quants (slow path, float32 result)",
            stacklevel=3,
        )
    return np.asarray(out, dtype=np.float32).reshape(out_shape)

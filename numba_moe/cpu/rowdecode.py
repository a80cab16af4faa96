"""Decode one row of GGUF blocks into the integer form the CPU dot products read.

The CPU kernels never build float weights.  Each weight row is unpacked,
once per work item, into a small per-thread buffer:

* ``w16`` int16 [cols]: the block's integer code times its integer sub-block
  scale (Q4_K/Q5_K: ``sc * q`` <= 63 * 31; Q6_K: ``sc * (q - 32)``, |.| <= 4096;
  Q8_0: ``q``), so a 256-value block dots with int16 activations in one
  integer reduction (LLVM emits ``vpmaddwd``/``vpdpwssd`` on x86 and
  ``smlal`` on ARM from the plain loop);
* ``dsc`` float32: the fp16 super-block scale ``d`` (per 256 values; per 32
  for Q8_0);
* ``dmins`` float32 [cols / 32] (Q4_K/Q5_K only): ``dmin * m`` of every
  32-value sub-block, the term the min correction multiplies by the
  activation sub-block sums.

So for a K-quant block ``b`` the weight is ``w = d * w16 - dmins[s]`` and
``dot(w, a) = d * ad * sum(w16 * aq) - sum_s dmins[s] * (ad * bsum_s)``.

All index arithmetic is written from loop counters (never from a function
argument) so that LLVM can prove indices non-negative, drop Numba's
wrap-around selects and vectorize; every intermediate is cast to a narrow
type on purpose, because Numba otherwise widens ``uint8 & 15`` to int64
lanes.
"""
import numpy as np
from numba import njit

from ..quants.fp16 import f16_bytes_to_f32

__all__ = ["decode_row_q4_k", "decode_row_q5_k", "decode_row_q6_k",
           "decode_row_q8_0"]


@njit(inline="always", cache=True)
def _k4_scale_words(q32, e, r, w0):
    """The 6-bit scales and mins of a Q4_K/Q5_K block, four to a uint32.

    ``q32[e, r, w0 .. w0+2]`` are the 12 scale bytes as little-endian words
    (a..h scales, A..H mins of sub-blocks 0..7)::

        word 0: HHdddddd GGcccccc FFbbbbbb EEaaaaaa
        word 1: hhDDDDDD ggCCCCCC ffBBBBBB eeAAAAAA
        word 2: hhhhHHHH ggggGGGG ffffFFFF eeeeEEEE

    Returns ``(scales 0-3, scales 4-7, mins 0-3, mins 4-7)``, one value per
    byte (byte i of a word is sub-block i mod 4).  Whole-word masks and shifts
    replace sixteen byte extractions (ggml's ``kmask`` trick).
    """
    m6 = np.uint32(0x3F3F3F3F)
    m4 = np.uint32(0x0F0F0F0F)
    m2 = np.uint32(0x03030303)
    a0 = q32[e, r, w0]
    a1 = q32[e, r, w0 + 1]
    a2 = q32[e, r, w0 + 2]
    sc_lo = a0 & m6
    mn_lo = a1 & m6
    sc_hi = (a2 & m4) | (((a0 >> np.uint32(6)) & m2) << np.uint32(4))
    mn_hi = ((a2 >> np.uint32(4)) & m4) | (((a1 >> np.uint32(6)) & m2) << np.uint32(4))
    return sc_lo, sc_hi, mn_lo, mn_hi


@njit(inline="always", cache=True)
def _k4_pair(words, j):
    """Scales (or mins) of sub-blocks ``2j`` and ``2j+1`` from :func:`_k4_scale_words`."""
    sc_lo, sc_hi, mn_lo, mn_hi = words
    sw = sc_lo if j < 2 else sc_hi
    mw = mn_lo if j < 2 else mn_hi
    sh = np.uint32(16 * (j % 2))
    s0 = np.int16(np.uint8(sw >> sh))
    s1 = np.int16(np.uint8(sw >> (sh + np.uint32(8))))
    m0 = np.uint8(mw >> sh)
    m1 = np.uint8(mw >> (sh + np.uint32(8)))
    return s0, s1, m0, m1


@njit(inline="always", cache=True)
def decode_row_q4_k(q, q32, e, r, nb, w16, dsc, dmins, s):
    """Unpack the ``nb`` Q4_K blocks (144 bytes each) of row ``q[e, r]`` into buffer row ``s``.

    Block layout: ``d`` fp16 @0, ``dmin`` fp16 @2, scales[12] @4, qs[128] @16.
    Values ``64j .. 64j+31`` are the low nibbles of ``qs[32j .. 32j+31]``,
    values ``64j+32 .. 64j+63`` their high nibbles::

        qs[32j + l] = HHHHLLLL  ->  y[64j + l] = L,  y[64j + 32 + l] = H

    Parameters
    ----------
    q : uint8 [E, rows, nb * 144]
    q32 : uint32 [E, rows, nb * 36]
        The same bytes as little-endian words (for the scale unpacking).
    e, r : int
        Expert and row.
    nb : int
        Blocks in the row (cols / 256).
    w16 : int16 [slots, >= nb * 256]
        Row ``s`` receives ``sc * q``.
    dsc : float32 [slots, >= nb]
        Row ``s`` receives ``d``.
    dmins : float32 [slots, >= nb * 8]
        Row ``s`` receives ``dmin * m`` per 32-value sub-block.
    s : int
        Buffer row.

    Rows and buffers are indexed in place, never sliced: a view made inside
    the kernels' loops costs an atomic reference-count update each time.
    """
    for b in range(nb):
        o = b * 144
        dsc[s, b] = f16_bytes_to_f32(q[e, r, o], q[e, r, o + 1])
        dmin = f16_bytes_to_f32(q[e, r, o + 2], q[e, r, o + 3])
        words = _k4_scale_words(q32, e, r, 36 * b + 1)
        for j in range(4):
            s0, s1, m0, m1 = _k4_pair(words, j)
            dmins[s, b * 8 + 2 * j] = dmin * np.float32(m0)
            dmins[s, b * 8 + 2 * j + 1] = dmin * np.float32(m1)
            qo = o + 16 + 32 * j
            w = b * 256 + 64 * j
            for l in range(32):
                v = q[e, r, qo + l]
                w16[s, w + l] = np.int16(v & np.uint8(15)) * s0
                w16[s, w + 32 + l] = np.int16(v >> np.uint8(4)) * s1


@njit(inline="always", cache=True)
def decode_row_q5_k(q, q32, e, r, nb, w16, dsc, dmins, s):
    """Unpack the ``nb`` Q5_K blocks (176 bytes each) of row ``q[e, r]`` into buffer row ``s``.

    Block layout: ``d`` @0, ``dmin`` @2, scales[12] @4, qh[32] @16,
    qs[128] @48.  Value ``i*32 + l`` (sub-block i = 2j + s) takes its low four
    bits from nibble ``s`` of ``qs[32j + l]`` and its fifth bit from bit ``i``
    of ``qh[l]``::

        qs[32j + l] = HHHHLLLL    qh[l] = b7 .. b0
        y[64j + l]      = L | b(2j)   << 4
        y[64j + 32 + l] = H | b(2j+1) << 4

    Arguments and outputs as :func:`decode_row_q4_k` (``q32``: [E, rows, nb * 44]).
    """
    for b in range(nb):
        o = b * 176
        dsc[s, b] = f16_bytes_to_f32(q[e, r, o], q[e, r, o + 1])
        dmin = f16_bytes_to_f32(q[e, r, o + 2], q[e, r, o + 3])
        words = _k4_scale_words(q32, e, r, 44 * b + 1)
        for j in range(4):
            s0, s1, m0, m1 = _k4_pair(words, j)
            dmins[s, b * 8 + 2 * j] = dmin * np.float32(m0)
            dmins[s, b * 8 + 2 * j + 1] = dmin * np.float32(m1)
            sh0 = np.uint8(2 * j)
            sh1 = np.uint8(2 * j + 1)
            qo = o + 48 + 32 * j
            w = b * 256 + 64 * j
            # One store stream per loop (see decode_row_q6_k).
            for l in range(32):
                lo = (q[e, r, qo + l] & np.uint8(15)) | (((q[e, r, o + 16 + l] >> sh0) & np.uint8(1)) << np.uint8(4))
                w16[s, w + l] = np.int16(lo) * s0
            for l in range(32):
                hi = (q[e, r, qo + l] >> np.uint8(4)) | (((q[e, r, o + 16 + l] >> sh1) & np.uint8(1)) << np.uint8(4))
                w16[s, w + 32 + l] = np.int16(hi) * s1


@njit(inline="always", cache=True)
def decode_row_q6_k(q, e, r, nb, w16, dsc, s):
    """Unpack the ``nb`` Q6_K blocks (210 bytes each) of row ``q[e, r]`` into buffer row ``s``.

    Block layout: ql[128] @0, qh[64] @128, scales int8[16] @192, ``d`` @208.
    Half ``n`` (values ``128n ..``) reads ``ql[64n ..]`` and ``qh[32n ..]``::

        a = ql[64n + l]   c = ql[64n + 32 + l]   h = qh[32n + l] = h3 h2 h1 h0 (2 bits each)
        y[128n + l]      = (a & 15) | h0 << 4      y[128n + 64 + l] = (a >> 4) | h2 << 4
        y[128n + 32 + l] = (c & 15) | h1 << 4      y[128n + 96 + l] = (c >> 4) | h3 << 4

    minus 32; value ``i`` uses the signed scale ``scales[i // 16]``.

    Parameters
    ----------
    q : uint8 [E, rows, nb * 210]
    e, r : int
        Expert and row.
    nb : int
    w16 : int16 [slots, >= nb * 256]
        Row ``s`` receives ``sc * (q - 32)``.
    dsc : float32 [slots, >= nb]
        Row ``s`` receives ``d``.
    s : int
        Buffer row.
    """
    for b in range(nb):
        o = b * 210
        dsc[s, b] = f16_bytes_to_f32(q[e, r, o + 208], q[e, r, o + 209])
        for n in range(2):
            for k in range(4):
                # Quarter k of half n (values 128n + 32k + l): nibble k // 2 of
                # ql[64n + 32 (k % 2) + l], bits 2k+1..2k of qh[32n + l].  One
                # 32-value loop with one store stream per quarter (a select
                # picks the scale of l < 16 or l >= 16) is the shape LLVM
                # vectorizes; four stores per iteration were 6x slower.
                ql = o + 64 * n + 32 * (k % 2)
                qh = o + 128 + 32 * n
                lsh = np.uint8(4 * (k // 2))
                hsh = np.uint8(2 * k)
                s0 = np.int16(np.int8(q[e, r, o + 192 + 8 * n + 2 * k]))
                s1 = np.int16(np.int8(q[e, r, o + 193 + 8 * n + 2 * k]))
                w = b * 256 + 128 * n + 32 * k
                for l in range(32):
                    qv = ((q[e, r, ql + l] >> lsh) & np.uint8(15)) | (((q[e, r, qh + l] >> hsh) & np.uint8(3)) << np.uint8(4))
                    w16[s, w + l] = (np.int16(qv) - np.int16(32)) * (s0 if l < 16 else s1)


@njit(inline="always", cache=True)
def decode_row_q8_0(q, e, r, nb32, w16, dsc, s):
    """Unpack the ``nb32`` Q8_0 blocks (34 bytes, 32 values each) of row ``q[e, r]`` into buffer row ``s``.

    Block layout: ``d`` fp16 @0, qs int8[32] @2; value = d * q.

    Parameters
    ----------
    q : uint8 [E, rows, nb32 * 34]
    e, r : int
        Expert and row.
    nb32 : int
    w16 : int16 [slots, >= nb32 * 32]
        Row ``s`` receives ``q``.
    dsc : float32 [slots, >= nb32]
        Row ``s`` receives ``d`` of every 32-value block.
    s : int
        Buffer row.
    """
    for b in range(nb32):
        o = b * 34
        dsc[s, b] = f16_bytes_to_f32(q[e, r, o], q[e, r, o + 1])
        for l in range(32):
            w16[s, b * 32 + l] = np.int16(np.int8(q[e, r, o + 2 + l]))

"""Per-type decoders: one 32-value *chunk* of a weight row into registers.

Every GEMM kernel walks a weight row in chunks of 32 values.  A decoder
fills ``q[qo : qo + 32]`` with the chunk's small integers (as float32) and
``ab[abo : abo + 8]`` with per-segment affine terms, so that value ``i`` of
segment ``s`` is ``ab[abo + s] * q[qo + s * SEGLEN + i] - ab[abo + 4 + s]``.
The kernels then compute ``sum(w * x)`` per segment as
``a * sum(q * x) - b * sum(x)`` (the ``sum(x)`` is shared by every row).

A chunk's segments are runs of ``SEGLEN`` consecutive columns starting at
``seg_col(chunk, s)``; they need not be adjacent (a Q4_K chunk takes low and
high nibbles of the same 16 bytes, which sit 32 columns apart).

Every decoder takes the same arguments ``(wa, wb, wc, wd, row, chunk, nb,
q, qo, ab, abo)``: four device arrays laid out by
:mod:`numba_moe.cuda.weights`, the global row ``e * rows + r``, the chunk
index in the row and ``nb``, the blocks per row.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import gguf
from numba import float32, int32

from .primitives import device_inline, load2, load4

__all__ = ["QInfo", "QINFO", "F32"]

Q = gguf.GGMLQuantizationType
#: Marker qtype of dense float32 weights on the device.
F32 = Q.F32


class QInfo(NamedTuple):
    """How the kernels walk one weight type.

    Attributes
    ----------
    qtype : gguf.GGMLQuantizationType
    nseg, seglen : int
        Segments per 32-value chunk and their length (``nseg * seglen == 32``).
    block_values : int
        Values per storage block (``nb = cols // block_values``).
    decode, seg_col : CUDA device functions
        See the module docstring.
    """

    qtype: Q
    nseg: int
    seglen: int
    block_values: int
    decode: Callable
    seg_col: Callable


@device_inline
def _sbyte(w, shift):
    """Signed byte of the word ``w`` at bit ``shift``."""
    b = int32((w >> shift) & 0xFF)
    return b - ((b & 0x80) << 1)


# ---------------------------------------------------------------- Q4_K / Q5_K
#
# Q4_K block (144 bytes, raw; word = uint32):
#
#   bytes 0..3     d fp16 | dmin fp16              word 0
#   bytes 4..15    scales[12]: 8 x (6-bit scale, 6-bit min)   words 1..3
#   bytes 16..143  qs[128]: 4 groups j of 32 bytes          words 4..35
#
#   group j holds values 64j .. 64j+63: byte l low nibble -> 64j + l,
#   high nibble -> 64j + 32 + l; sub-blocks 2j (low) and 2j+1 (high).
#   Chunk c (0..7) of a block = group j = c >> 1, bytes 16h .. 16h+15
#   (h = c & 1): segment 0 = low nibbles, segment 1 = high nibbles.
#
#   6-bit scale / min of sub-block sb (ggml get_scale_min_k4), b = sb & 3:
#     sb < 4:  sc = scales[sb] & 63           m = scales[sb+4] & 63
#     sb >= 4: sc = scales[sb+4] & 15 | (scales[sb-4] >> 6) << 4
#              m  = scales[sb+4] >> 4 | (scales[sb]   >> 6) << 4
#   scales[0..3] = word 1, scales[4..7] = word 2, scales[8..11] = word 3.
#
# Q5_K block (176 bytes): same header; qh[32] @16 (words 4..11), qs[128] @48
# (words 12..43).  Value bit 4 of byte l of group j: qh[l] bit 2j (low
# nibble) or bit 2j+1 (high nibble).


@device_inline
def _kq_scale_min(h1, h2, h3, sb):
    """(scale, min) 6-bit integers of sub-block ``sb`` from header words 1..3."""
    sh = (sb & 3) * 8
    if sb < 4:
        return int32((h1 >> sh) & 63), int32((h2 >> sh) & 63)
    sc = ((h3 >> sh) & 0xF) | (((h1 >> (sh + 6)) & 3) << 4)
    m = ((h3 >> (sh + 4)) & 0xF) | (((h2 >> (sh + 6)) & 3) << 4)
    return int32(sc), int32(m)


@device_inline
def _nibbles(q, o, w):
    """Low nibbles of the 4 bytes of ``w`` to q[o..o+3], high to q[o+16..o+19]."""
    for n in range(4):
        q[o + n] = float32((w >> (8 * n)) & 0xF)
        q[o + 16 + n] = float32((w >> (8 * n + 4)) & 0xF)


@device_inline
def _nibbles5(q, o, w, hw, bit):
    """As :func:`_nibbles` with bit 4 from ``hw`` (bit ``bit`` low, ``bit+1`` high)."""
    for n in range(4):
        q[o + n] = float32(((w >> (8 * n)) & 0xF) | (((hw >> (8 * n + bit)) & 1) << 4))
        q[o + 16 + n] = float32(((w >> (8 * n + 4)) & 0xF)
                                | (((hw >> (8 * n + bit + 1)) & 1) << 4))


@device_inline
def _kq_affine(wa, wd, blk, words, halves, j, ab, abo):
    """d*scale / dmin*min of sub-blocks 2j, 2j+1 into ab (Q4_K and Q5_K)."""
    h0, h1, h2, h3 = load4(wa, blk * words)
    d = float32(wd[blk * halves])
    dmin = float32(wd[blk * halves + 1])
    sc0, m0 = _kq_scale_min(h1, h2, h3, 2 * j)
    sc1, m1 = _kq_scale_min(h1, h2, h3, 2 * j + 1)
    ab[abo] = d * float32(sc0)
    ab[abo + 1] = d * float32(sc1)
    ab[abo + 4] = dmin * float32(m0)
    ab[abo + 5] = dmin * float32(m1)


@device_inline
def q4k_decode(wa, wb, wc, wd, row, chunk, nb, q, qo, ab, abo):
    blk = row * nb + (chunk >> 3)
    c = chunk & 7
    _kq_affine(wa, wd, blk, 36, 72, c >> 1, ab, abo)
    w0, w1, w2, w3 = load4(wa, blk * 36 + 4 + 4 * c)
    _nibbles(q, qo, w0)
    _nibbles(q, qo + 4, w1)
    _nibbles(q, qo + 8, w2)
    _nibbles(q, qo + 12, w3)


@device_inline
def q5k_decode(wa, wb, wc, wd, row, chunk, nb, q, qo, ab, abo):
    blk = row * nb + (chunk >> 3)
    c = chunk & 7
    j = c >> 1
    h = c & 1
    _kq_affine(wa, wd, blk, 44, 88, j, ab, abo)
    e0, e1, e2, e3 = load4(wa, blk * 44 + 4 + 4 * h)
    w0, w1, w2, w3 = load4(wa, blk * 44 + 12 + 8 * j + 4 * h)
    _nibbles5(q, qo, w0, e0, 2 * j)
    _nibbles5(q, qo + 4, w1, e1, 2 * j)
    _nibbles5(q, qo + 8, w2, e2, 2 * j)
    _nibbles5(q, qo + 12, w3, e3, 2 * j)


@device_inline
def kq_seg_col(chunk, s):
    c = chunk & 7
    return (chunk >> 3) * 256 + (c >> 1) * 64 + (c & 1) * 16 + s * 32


# ---------------------------------------------------------------------- Q6_K
#
# Q6_K block (210 bytes) is stored split in planes by weights.py, so every
# plane is 16-byte aligned: wa = ql (128 B / block), wb = qh (64 B),
# wc = scales int8[16] (16 B), wd = d fp16.
#
#   half n (0, 1) covers values 128n .. 128n+127 with ql[64n..], qh[32n..],
#   scales[8n..]; for l in 0..31:
#     128n + l      : ql[64n+l] & 15 | (qh[32n+l] >> 0 & 3) << 4   scale[8n + l/16]
#     128n + l + 32 : ql[64n+32+l] & 15 | (qh >> 2 & 3) << 4        scale[8n + l/16 + 2]
#     128n + l + 64 : ql[64n+l] >> 4 | (qh >> 4 & 3) << 4           scale[8n + l/16 + 4]
#     128n + l + 96 : ql[64n+32+l] >> 4 | (qh >> 6 & 3) << 4        scale[8n + l/16 + 6]
#   value = d * scale * (q - 32).
#   Chunk c (0..7) of a block: n = c >> 2, l = 8g .. 8g+7 (g = c & 3); its four
#   segments of 8 are the four rows of the table above.


@device_inline
def _q6_bytes(q, o, lw, uw, hw):
    """Four l positions (bytes of the words ``lw``, ``uw``, ``hw``) into the
    four segments of 8 at q[o], q[o+8], q[o+16], q[o+24]."""
    for n in range(4):
        lb = (lw >> (8 * n)) & 0xFF
        ub = (uw >> (8 * n)) & 0xFF
        hb = (hw >> (8 * n)) & 0xFF
        q[o + n] = float32((lb & 0xF) | ((hb & 3) << 4))
        q[o + 8 + n] = float32((ub & 0xF) | (((hb >> 2) & 3) << 4))
        q[o + 16 + n] = float32((lb >> 4) | (((hb >> 4) & 3) << 4))
        q[o + 24 + n] = float32((ub >> 4) | (((hb >> 6) & 3) << 4))


@device_inline
def q6k_decode(wa, wb, wc, wd, row, chunk, nb, q, qo, ab, abo):
    blk = row * nb + (chunk >> 3)
    c = chunk & 7
    n = c >> 2
    g = c & 3
    l0, l1 = load2(wa, blk * 32 + 16 * n + 2 * g)
    u0, u1 = load2(wa, blk * 32 + 16 * n + 8 + 2 * g)
    e0, e1 = load2(wb, blk * 16 + 8 * n + 2 * g)
    s0, s1 = load2(wc, blk * 4 + 2 * n)
    d = float32(wd[blk])
    sh = (g >> 1) * 8
    a0 = d * float32(_sbyte(s0, sh))
    a1 = d * float32(_sbyte(s0, sh + 16))
    a2 = d * float32(_sbyte(s1, sh))
    a3 = d * float32(_sbyte(s1, sh + 16))
    ab[abo] = a0
    ab[abo + 1] = a1
    ab[abo + 2] = a2
    ab[abo + 3] = a3
    ab[abo + 4] = float32(32) * a0
    ab[abo + 5] = float32(32) * a1
    ab[abo + 6] = float32(32) * a2
    ab[abo + 7] = float32(32) * a3
    _q6_bytes(q, qo, l0, u0, e0)
    _q6_bytes(q, qo + 4, l1, u1, e1)


@device_inline
def q6k_seg_col(chunk, s):
    c = chunk & 7
    return (chunk >> 3) * 256 + (c >> 2) * 128 + (c & 3) * 8 + s * 32


# ---------------------------------------------------------------------- Q8_0
#
# Q8_0 block (34 bytes: d fp16, qs int8[32]) is stored split: wa = qs
# (32 B / block), wd = d.  A chunk is one block; two segments of 16.


@device_inline
def _sbytes(q, o, w):
    for n in range(4):
        q[o + n] = float32(_sbyte(w, 8 * n))


@device_inline
def q80_decode(wa, wb, wc, wd, row, chunk, nb, q, qo, ab, abo):
    blk = row * nb + chunk
    w0, w1, w2, w3 = load4(wa, blk * 8)
    w4, w5, w6, w7 = load4(wa, blk * 8 + 4)
    d = float32(wd[blk])
    ab[abo] = d
    ab[abo + 1] = d
    ab[abo + 4] = float32(0)
    ab[abo + 5] = float32(0)
    _sbytes(q, qo, w0)
    _sbytes(q, qo + 4, w1)
    _sbytes(q, qo + 8, w2)
    _sbytes(q, qo + 12, w3)
    _sbytes(q, qo + 16, w4)
    _sbytes(q, qo + 20, w5)
    _sbytes(q, qo + 24, w6)
    _sbytes(q, qo + 28, w7)


# ----------------------------------------------------------------------- F32
#
# Dense float32 rows (wa), for the router and for types without a decoder.


@device_inline
def f32_decode(wa, wb, wc, wd, row, chunk, nb, q, qo, ab, abo):
    base = (row * nb + chunk) * 32
    for k in range(8):
        v0, v1, v2, v3 = load4(wa, base + 4 * k)
        q[qo + 4 * k] = v0
        q[qo + 4 * k + 1] = v1
        q[qo + 4 * k + 2] = v2
        q[qo + 4 * k + 3] = v3
    ab[abo] = float32(1)
    ab[abo + 1] = float32(1)
    ab[abo + 4] = float32(0)
    ab[abo + 5] = float32(0)


@device_inline
def flat_seg_col(chunk, s):
    return chunk * 32 + s * 16


#: Decoder table, by the type the device arrays hold.
QINFO = {
    Q.Q4_K: QInfo(Q.Q4_K, 2, 16, 256, q4k_decode, kq_seg_col),
    Q.Q5_K: QInfo(Q.Q5_K, 2, 16, 256, q5k_decode, kq_seg_col),
    Q.Q6_K: QInfo(Q.Q6_K, 4, 8, 256, q6k_decode, q6k_seg_col),
    Q.Q8_0: QInfo(Q.Q8_0, 2, 16, 32, q80_decode, flat_seg_col),
    F32: QInfo(F32, 2, 16, 32, f32_decode, flat_seg_col),
}

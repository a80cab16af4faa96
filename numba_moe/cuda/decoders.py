"""Per-type decoders: one 32-value *chunk* of a weight row into registers.

Every GEMM kernel walks a weight row in chunks of 32 values, split into
``NSEG`` segments of ``SEGLEN`` consecutive columns.  Value ``i`` of segment
``s`` is ``a_s * q_i - b_s`` with small integers ``q`` and per-segment
affine terms ``a_s``, ``b_s`` (``ab[abo + s]``, ``ab[abo + 4 + s]``).

A chunk's segments are runs of ``SEGLEN`` consecutive columns starting at
``seg_col(chunk, s)``; they need not be adjacent (a Q4_K chunk takes low and
high nibbles of the same 16 bytes, which sit 32 columns apart).

Per type there are three device functions:

* ``fetch(wa, wb, wc, wd, row, chunk, nb) -> raw``: the loads of a chunk
  (four device arrays laid out by :mod:`numba_moe.cuda.weights`, the global
  row ``e * rows + r``, the chunk index in the row, ``nb`` blocks per row),
  as a tuple of raw words;
* ``affine(raw, chunk, ab, abo)``: the ``a_s``, ``b_s`` of every segment;
* ``values4(raw, chunk, v, s) -> (q0, q1, q2, q3)``: the integers of
  values ``4v .. 4v+3`` of segment ``s`` as float32 (``v``, ``s`` become
  constants once the kernels' loops are unrolled);
* ``codes4(raw, chunk, v, s) -> word``: the same four integers as the
  signed bytes of one 32-bit word (byte ``i`` = value ``4v + i``), for the
  ``dp4a`` GEMV (:mod:`.qgemv`); quantized types only.

The integer tensor-core kernel (:mod:`.mma`, for Q5_K and Q8_0: Q4_K and
Q6_K take the fp16 kernel of :mod:`.hmma`, which unpacks them itself) walks
a row in *steps* of 32 columns, one scale each, and lane ``i`` of a quad
needs columns ``32 kt + 4i .. + 3`` and ``32 kt + 16 + 4i .. + 3``:

* ``kstep32(wa, wb, wc, wd, row, kt, nb, i) -> (word, word_hi, a, b)``:
  those codes (as ``codes4``) and the step's affine terms.

``unpack`` and ``decode`` (fetch + unpack) fill a whole chunk into a local
array ``q`` for the tiled kernel; the GEMV kernel dequantizes four values at
a time, right before it uses them, to keep few registers live.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import gguf
from numba import float32, int32, uint32

from .primitives import as_f32, device_inline, half2_f32, load2, load4

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
    fetch, affine, values4, unpack, decode, seg_col : CUDA device functions
        See the module docstring.
    codes4, kstep32 : CUDA device functions or None
        See the module docstring; None for dense float32 weights
        (``kstep32`` also for Q4_K and Q6_K, which :mod:`.hmma` reads).
    fetch2 : CUDA device function or None
        ``fetch2(wa, wb, wc, wd, row, chunk, nb) -> (raw, raw_next)``: the
        raws of chunks ``chunk`` (even) and ``chunk + 1`` in wider loads, for
        a type of 8-value segments whose two chunks share their affine terms
        and whose segment ``s`` of the second chunk continues segment ``s``
        of the first, so that the two fill 16-column activation groups
        (Q6_K); None otherwise.
    codes_center : int
        The middle of the code range (8 for Q4_K's 0..15, 32 for Q6_K, 0 for
        signed Q8_0): the GEMV's rounding error is that of ``code - center``.
    has_offset : bool
        Whether the ``b_s`` terms can be nonzero (the GEMV kernel then also
        sums the activations of each segment).
    """

    qtype: Q
    nseg: int
    seglen: int
    block_values: int
    fetch: Callable
    affine: Callable
    values4: Callable
    unpack: Callable
    decode: Callable
    seg_col: Callable
    has_offset: bool
    codes4: Optional[Callable]
    codes_center: int
    kstep32: Optional[Callable]
    fetch2: Optional[Callable] = None


# Small integers become float32 without the quarter-rate integer-to-float
# unit: OR-ing ``n < 2**23`` into the mantissa of 2**23 gives the float
# 2**23 + n exactly, and one subtraction leaves n.
_MAGIC = uint32(0x4B000000)
_TWO23 = float32(8388608.0)
# Signed bytes: (b ^ 0x80) = b + 128, so subtract 2**23 + 128.
_TWO23_128 = float32(8388736.0)
_U4 = uint32(0xF)
_U8 = uint32(0xFF)
# the same masks in every byte of a word
_B4 = uint32(0x0F0F0F0F)
_B2 = uint32(0x03030303)
_B1 = uint32(0x01010101)


@device_inline
def _small(n):
    """float32 of ``n`` (uint32 < 2**23)."""
    return as_f32(n | _MAGIC) - _TWO23


@device_inline
def _sbyte_f(w, shift):
    """float32 of the signed byte of ``w`` at bit ``shift``."""
    return as_f32((((w >> shift) & _U8) ^ uint32(0x80)) | _MAGIC) - _TWO23_128


@device_inline
def sbyte(w, shift):
    """Signed byte of the word ``w`` at bit ``shift``, as int32."""
    b = int32((w >> shift) & _U8)
    return b - ((b & 0x80) << 1)


@device_inline
def _pick4(i, a, b, c, d):
    """``(a, b, c, d)[i]`` for a run-time ``i`` (a select chain that folds
    away once ``i`` is a constant)."""
    if i == 0:
        return a
    if i == 1:
        return b
    if i == 2:
        return c
    return d


@device_inline
def _nib4(w, shift):
    """The 4 nibbles of ``w`` at bits ``shift``, ``shift + 8``, ... as float32."""
    return (_small((w >> shift) & _U4), _small((w >> (shift + uint32(8))) & _U4),
            _small((w >> (shift + uint32(16))) & _U4), _small((w >> (shift + uint32(24))) & _U4))


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
#   (h = c & 1) = words w0..w3: segment 0 = low nibbles, segment 1 = high
#   nibbles; values 4v..4v+3 of a segment come from word w_v.
#
#   6-bit scale / min of sub-block sb (ggml get_scale_min_k4), b = sb & 3:
#     sb < 4:  sc = scales[sb] & 63           m = scales[sb+4] & 63
#     sb >= 4: sc = scales[sb+4] & 15 | (scales[sb-4] >> 6) << 4
#              m  = scales[sb+4] >> 4 | (scales[sb]   >> 6) << 4
#   scales[0..3] = word 1, scales[4..7] = word 2, scales[8..11] = word 3.
#
# Q5_K block (176 bytes): same header; qh[32] @16 (words 4..11), qs[128] @48
# (words 12..43).  Value bit 4 of byte l of group j: qh[l] bit 2j (low
# nibble) or bit 2j+1 (high nibble); the chunk's qh bytes are words e0..e3.


@device_inline
def _kq_affine(h0, h1, h2, h3, j, ab, abo):
    """d*scale / dmin*min of sub-blocks 2j, 2j+1 into ab (Q4_K and Q5_K).

    All eight 6-bit scales and mins unpacked a byte per value with
    whole-word masks (no branch on ``j``), then the two of group ``j``
    picked by one word select and one shift.
    """
    d, dmin = half2_f32(h0)
    sc, mn = kq_scale_words(h1, h2, h3, 2 * j)
    ab[abo] = d * _small(sc & _U8)
    ab[abo + 1] = d * _small((sc >> uint32(8)) & _U8)
    ab[abo + 4] = dmin * _small(mn & _U8)
    ab[abo + 5] = dmin * _small((mn >> uint32(8)) & _U8)


@device_inline
def kq_scale_words(h1, h2, h3, sb):
    #   header words 1..3 of a Q4_K / Q5_K block (bytes 4..15), byte j = 0..3:
    #     h1: sc_j (bits 0-5) | bits 4-5 of sc_{j+4} (bits 6-7)
    #     h2: m_j  (bits 0-5) | bits 4-5 of m_{j+4}  (bits 6-7)
    #     h3: bits 0-3 of sc_{j+4} (bits 0-3) | bits 0-3 of m_{j+4} (bits 4-7)
    """Words ``(scales, mins)`` whose byte ``k`` is the 6-bit scale / min of
    sub-block ``sb + k`` (``sb`` 0..7, ``k`` up to the end of its half of
    the block): all four of a half unpacked with whole-word masks."""
    m6 = uint32(0x3F3F3F3F)
    m4 = uint32(0x0F0F0F0F)
    m2 = uint32(0x03030303)
    hi = sb >= 4
    sc = ((h3 & m4) | (((h1 >> uint32(6)) & m2) << uint32(4))) if hi else h1 & m6
    mn = (((h3 >> uint32(4)) & m4) | (((h2 >> uint32(6)) & m2) << uint32(4))) if hi else h2 & m6
    sh = uint32(8 * (sb & 3))
    return sc >> sh, mn >> sh


@device_inline
def kq_scale_min(h1, h2, h3, sb):
    """6-bit ``(scale, min)`` of sub-block ``sb`` (0..7) of a Q4_K / Q5_K block
    from its header words 1..3, as uint32."""
    sc, mn = kq_scale_words(h1, h2, h3, sb)
    return sc & _U8, mn & _U8


@device_inline
def _kq_sub_affine(h0, h1, h2, h3, sb):
    """``(d * scale, dmin * min)`` of sub-block ``sb`` (0..7), as :func:`_kq_affine`."""
    d, dmin = half2_f32(h0)
    sc, mn = kq_scale_min(h1, h2, h3, sb)
    return d * _small(sc), dmin * _small(mn)


@device_inline
def q4k_fetch(wa, wb, wc, wd, row, chunk, nb):
    blk = row * nb + (chunk >> 3)
    h0, h1, h2, h3 = load4(wa, blk * 36)
    w0, w1, w2, w3 = load4(wa, blk * 36 + 4 + 4 * (chunk & 7))
    return (h0, h1, h2, h3, w0, w1, w2, w3)


@device_inline
def q4k_affine(raw, chunk, ab, abo):
    h0, h1, h2, h3, w0, w1, w2, w3 = raw
    _kq_affine(h0, h1, h2, h3, (chunk & 7) >> 1, ab, abo)


@device_inline
def q4k_values4(raw, chunk, v, s):
    h0, h1, h2, h3, w0, w1, w2, w3 = raw
    return _nib4(_pick4(v, w0, w1, w2, w3), uint32(4 * s))


@device_inline
def q4k_codes4(raw, chunk, v, s):
    h0, h1, h2, h3, w0, w1, w2, w3 = raw
    return (_pick4(v, w0, w1, w2, w3) >> uint32(4 * s)) & _B4


@device_inline
def q5k_fetch(wa, wb, wc, wd, row, chunk, nb):
    blk = row * nb + (chunk >> 3)
    c = chunk & 7
    h0, h1, h2, h3 = load4(wa, blk * 44)
    e0, e1, e2, e3 = load4(wa, blk * 44 + 4 + 4 * (c & 1))
    w0, w1, w2, w3 = load4(wa, blk * 44 + 12 + 8 * (c >> 1) + 4 * (c & 1))
    return (h0, h1, h2, h3, w0, w1, w2, w3, e0, e1, e2, e3)


@device_inline
def q5k_affine(raw, chunk, ab, abo):
    h0, h1, h2, h3, w0, w1, w2, w3, e0, e1, e2, e3 = raw
    _kq_affine(h0, h1, h2, h3, (chunk & 7) >> 1, ab, abo)


@device_inline
def q5k_values4(raw, chunk, v, s):
    h0, h1, h2, h3, w0, w1, w2, w3, e0, e1, e2, e3 = raw
    w = _pick4(v, w0, w1, w2, w3)
    e = _pick4(v, e0, e1, e2, e3)
    sh = uint32(4 * s)
    bit = uint32(2 * ((chunk & 7) >> 1) + s)
    one = uint32(1)
    return (_small(((w >> sh) & _U4) | (((e >> bit) & one) << uint32(4))),
            _small(((w >> (sh + uint32(8))) & _U4)
                   | (((e >> (bit + uint32(8))) & one) << uint32(4))),
            _small(((w >> (sh + uint32(16))) & _U4)
                   | (((e >> (bit + uint32(16))) & one) << uint32(4))),
            _small(((w >> (sh + uint32(24))) & _U4)
                   | (((e >> (bit + uint32(24))) & one) << uint32(4))))


@device_inline
def q5k_codes4(raw, chunk, v, s):
    h0, h1, h2, h3, w0, w1, w2, w3, e0, e1, e2, e3 = raw
    w = _pick4(v, w0, w1, w2, w3)
    e = _pick4(v, e0, e1, e2, e3)
    bit = uint32(2 * ((chunk & 7) >> 1) + s)
    return ((w >> uint32(4 * s)) & _B4) | (((e >> bit) & _B1) << uint32(4))


@device_inline
def q5k_kstep32(wa, wb, wc, wd, row, kt, nb, i):
    blk = row * nb + (kt >> 3)
    sb = kt & 7
    h0, h1, h2, h3 = load4(wa, blk * 44)
    o = blk * 44 + 12 + 8 * (sb >> 1) + i
    e = blk * 44 + 4 + i
    a, b = _kq_sub_affine(h0, h1, h2, h3, sb)
    sh = uint32(4 * (sb & 1))
    bit = uint32(sb)
    lo = ((wa[o] >> sh) & _B4) | (((wa[e] >> bit) & _B1) << uint32(4))
    hi = ((wa[o + 4] >> sh) & _B4) | (((wa[e + 4] >> bit) & _B1) << uint32(4))
    return lo, hi, a, b


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
#   segments of 8 are the four rows of the table above.  Words: ql[64n+l]
#   = l0, l1; ql[64n+32+l] = u0, u1; qh[32n+l] = e0, e1 (values 4v..4v+3
#   from word v of each).


@device_inline
def _q6k_at(row, chunk, nb):
    """Word offsets of chunk ``chunk``'s ql words ``l`` and ``u``, its qh and
    its scales in their planes, and its block."""
    blk = row * nb + (chunk >> 3)
    c = chunk & 7
    n = c >> 2
    g = c & 3
    return (blk * 32 + 16 * n + 2 * g, blk * 32 + 16 * n + 8 + 2 * g, blk * 16 + 8 * n + 2 * g,
            blk * 4 + 2 * n, blk)


@device_inline
def q6k_fetch(wa, wb, wc, wd, row, chunk, nb):
    lo, uo, ho, so, blk = _q6k_at(row, chunk, nb)
    l0, l1 = load2(wa, lo)
    u0, u1 = load2(wa, uo)
    e0, e1 = load2(wb, ho)
    s0, s1 = load2(wc, so)
    return (l0, l1, u0, u1, e0, e1, s0, s1, float32(wd[blk]))


@device_inline
def q6k_fetch2(wa, wb, wc, wd, row, chunk, nb):
    # chunks 2m, 2m + 1 of a half (g = 2m, 2m + 1): l = 16m .. 16m + 15,
    # one scale byte a segment for both
    lo, uo, ho, so, blk = _q6k_at(row, chunk, nb)
    l0, l1, l2, l3 = load4(wa, lo)
    u0, u1, u2, u3 = load4(wa, uo)
    e0, e1, e2, e3 = load4(wb, ho)
    s0, s1 = load2(wc, so)
    d = float32(wd[blk])
    return (l0, l1, u0, u1, e0, e1, s0, s1, d), (l2, l3, u2, u3, e2, e3, s0, s1, d)


@device_inline
def q6k_affine(raw, chunk, ab, abo):
    l0, l1, u0, u1, e0, e1, s0, s1, d = raw
    sh = uint32(((chunk & 3) >> 1) * 8)
    a0 = d * float32(sbyte(s0, sh))
    a1 = d * float32(sbyte(s0, sh + uint32(16)))
    a2 = d * float32(sbyte(s1, sh))
    a3 = d * float32(sbyte(s1, sh + uint32(16)))
    ab[abo] = a0
    ab[abo + 1] = a1
    ab[abo + 2] = a2
    ab[abo + 3] = a3
    ab[abo + 4] = float32(32) * a0
    ab[abo + 5] = float32(32) * a1
    ab[abo + 6] = float32(32) * a2
    ab[abo + 7] = float32(32) * a3


@device_inline
def q6k_values4(raw, chunk, v, s):
    l0, l1, u0, u1, e0, e1, s0, s1, d = raw
    lw = l0 if v == 0 else l1
    uw = u0 if v == 0 else u1
    h = e0 if v == 0 else e1
    w = lw if (s & 1) == 0 else uw
    sh = uint32(4 * (s >> 1))
    hs = uint32(2 * s)
    three = uint32(3)
    return (_small(((w >> sh) & _U4) | (((h >> hs) & three) << uint32(4))),
            _small(((w >> (sh + uint32(8))) & _U4)
                   | (((h >> (hs + uint32(8))) & three) << uint32(4))),
            _small(((w >> (sh + uint32(16))) & _U4)
                   | (((h >> (hs + uint32(16))) & three) << uint32(4))),
            _small(((w >> (sh + uint32(24))) & _U4)
                   | (((h >> (hs + uint32(24))) & three) << uint32(4))))


@device_inline
def q6k_codes4(raw, chunk, v, s):
    l0, l1, u0, u1, e0, e1, s0, s1, d = raw
    lw = l0 if v == 0 else l1
    uw = u0 if v == 0 else u1
    h = e0 if v == 0 else e1
    w = lw if (s & 1) == 0 else uw
    return ((w >> uint32(4 * (s >> 1))) & _B4) | (((h >> uint32(2 * s)) & _B2) << uint32(4))


@device_inline
def q6k_seg_col(chunk, s):
    c = chunk & 7
    return (chunk >> 3) * 256 + (c >> 2) * 128 + (c & 3) * 8 + s * 32


# ---------------------------------------------------------------------- Q8_0
#
# Q8_0 block (34 bytes: d fp16, qs int8[32]) is stored split: wa = qs
# (32 B / block, words w0..w7), wd = d.  A chunk is one block; segment s
# of 16 values is words 4s .. 4s+3.


@device_inline
def q80_fetch(wa, wb, wc, wd, row, chunk, nb):
    blk = row * nb + chunk
    w0, w1, w2, w3 = load4(wa, blk * 8)
    w4, w5, w6, w7 = load4(wa, blk * 8 + 4)
    return (w0, w1, w2, w3, w4, w5, w6, w7, float32(wd[blk]))


@device_inline
def q80_affine(raw, chunk, ab, abo):
    d = raw[8]
    ab[abo] = d
    ab[abo + 1] = d
    ab[abo + 4] = float32(0)
    ab[abo + 5] = float32(0)


@device_inline
def q80_values4(raw, chunk, v, s):
    w0, w1, w2, w3, w4, w5, w6, w7, d = raw
    w = _pick4(v, w0, w1, w2, w3) if s == 0 else _pick4(v, w4, w5, w6, w7)
    return (_sbyte_f(w, uint32(0)), _sbyte_f(w, uint32(8)), _sbyte_f(w, uint32(16)),
            _sbyte_f(w, uint32(24)))


@device_inline
def q80_codes4(raw, chunk, v, s):
    w0, w1, w2, w3, w4, w5, w6, w7, d = raw
    return _pick4(v, w0, w1, w2, w3) if s == 0 else _pick4(v, w4, w5, w6, w7)


@device_inline
def q80_kstep32(wa, wb, wc, wd, row, kt, nb, i):
    blk = row * nb + kt
    return wa[blk * 8 + i], wa[blk * 8 + 4 + i], float32(wd[blk]), float32(0)


# ----------------------------------------------------------------------- F32
#
# Dense float32 rows (wa), for the router and for types without a decoder;
# "fetch" only computes the address, the values are loaded where used.


@device_inline
def f32_fetch(wa, wb, wc, wd, row, chunk, nb):
    return (wa, (row * nb + chunk) * 32)


@device_inline
def f32_affine(raw, chunk, ab, abo):
    ab[abo] = float32(1)
    ab[abo + 1] = float32(1)
    ab[abo + 4] = float32(0)
    ab[abo + 5] = float32(0)


@device_inline
def f32_values4(raw, chunk, v, s):
    wa, base = raw
    return load4(wa, base + 16 * s + 4 * v)


@device_inline
def flat_seg_col(chunk, s):
    return chunk * 32 + s * 16


def _unpacker(affine, values4, nseg, seglen):
    @device_inline
    def unpack(raw, chunk, q, qo, ab, abo):
        affine(raw, chunk, ab, abo)
        for s in range(nseg):
            for v in range(seglen // 4):
                q0, q1, q2, q3 = values4(raw, chunk, v, s)
                o = qo + s * seglen + 4 * v
                q[o] = q0
                q[o + 1] = q1
                q[o + 2] = q2
                q[o + 3] = q3

    return unpack


def _decoder(fetch, unpack):
    @device_inline
    def decode(wa, wb, wc, wd, row, chunk, nb, q, qo, ab, abo):
        unpack(fetch(wa, wb, wc, wd, row, chunk, nb), chunk, q, qo, ab, abo)

    return decode


def _info(qtype, nseg, seglen, block_values, fetch, affine, values4, seg_col, has_offset,
          codes4=None, codes_center=0, kstep32=None, fetch2=None):
    unpack = _unpacker(affine, values4, nseg, seglen)
    return QInfo(qtype, nseg, seglen, block_values, fetch, affine, values4, unpack,
                 _decoder(fetch, unpack), seg_col, has_offset, codes4, codes_center, kstep32,
                 fetch2)


#: Decoder table, by the type the device arrays hold.
QINFO = {
    Q.Q4_K: _info(Q.Q4_K, 2, 16, 256, q4k_fetch, q4k_affine, q4k_values4, kq_seg_col, True,
                  q4k_codes4, 8),
    Q.Q5_K: _info(Q.Q5_K, 2, 16, 256, q5k_fetch, q5k_affine, q5k_values4, kq_seg_col, True,
                  q5k_codes4, 16, q5k_kstep32),
    Q.Q6_K: _info(Q.Q6_K, 4, 8, 256, q6k_fetch, q6k_affine, q6k_values4, q6k_seg_col, True,
                  q6k_codes4, 32, fetch2=q6k_fetch2),
    Q.Q8_0: _info(Q.Q8_0, 2, 16, 32, q80_fetch, q80_affine, q80_values4, flat_seg_col, False,
                  q80_codes4, kstep32=q80_kstep32),
    F32: _info(F32, 2, 16, 32, f32_fetch, f32_affine, f32_values4, flat_seg_col, False),
}

"""Dot products of one decoded weight row with one activation row.

The integer forms pair a row decoded by :mod:`numba_moe.cpu.rowdecode` with an
activation row quantized by :mod:`numba_moe.cpu.actquant` (int16 values,
one float32 scale per 256, scaled sub-block sums per 32).  Each 256-value
block is one int32 reduction of int16 products, written as a plain loop with
a single accumulator: that is the shape LLVM turns into ``vpmaddwd`` /
``vpdpwssd`` (x86) or ``smlal`` (ARM).  Two reductions sharing one operand
in the same loop defeat that pattern match (LLVM falls back to 32-bit
multiplies), so gate and up get separate loops.

Overflow: ``|w16| <= 4096`` (Q6_K) and ``|aq| <= 2047`` bound a 256-term sum
by ``256 * 4096 * 2047 < 2**31``; int32 wrap-around could only happen past
that, and intermediate partial sums wrap harmlessly.

The callers compile with ``fastmath={'reassoc', 'contract'}`` so the float
reductions vectorize; that only reorders roundings (no ``nnan``/``ninf``:
NaN and Inf still propagate).
"""
import numpy as np
from numba import njit

__all__ = ["dot_kquant", "dot_q8_0", "dot_dense"]


@njit(inline="always", cache=True)
def dot_kquant(w16, dsc, dmins, s, with_mins, aq, ad, amb, t, nb):
    """``w . x`` for a K-quant row (Q4_K, Q5_K, Q6_K).

    Parameters
    ----------
    w16, dsc, dmins
        Decode buffers; row ``s`` holds the decoded row (int16 [nb*256],
        float32 [nb], float32 [nb*8]).
    s : int
    with_mins : bool
        Q4_K / Q5_K (subtract the min term); False for Q6_K.
    aq, ad, amb
        Quantized activations; row ``t`` is used: int16 [nb*256],
        float32 [nb], float32 [nb*8] (``ad * bsum`` per 32 values).
    t : int
    nb : int
        256-value blocks in the row.

    Returns
    -------
    float32
    """
    f = np.float32(0.0)
    for b in range(nb):
        acc = np.int32(0)
        for i in range(256):
            acc = np.int32(acc + np.int32(w16[s, b * 256 + i]) * np.int32(aq[t, b * 256 + i]))
        f += ad[t, b] * dsc[s, b] * np.float32(acc)
    if with_mins:
        c = np.float32(0.0)
        for i in range(nb * 8):
            c += dmins[s, i] * amb[t, i]
        f -= c
    return f


@njit(inline="always", cache=True)
def dot_q8_0(w16, dsc, s, aq, ad, t, nb32):
    """``w . x`` for a Q8_0 row: ``nb32`` blocks of 32, one scale each (buffer
    row ``s``, activation row ``t``, as in :func:`dot_kquant`).

    The activation scale ``ad`` is per 256 values (eight Q8_0 blocks).  Eight
    blocks share one 32-step loop with eight accumulators: LLVM leaves a
    32-step loop with a single reduction scalar (8x slower), but vectorizes
    this one.
    """
    f = np.float32(0.0)
    for g in range(nb32 // 8):
        o = g * 256
        a0 = np.int32(0)
        a1 = np.int32(0)
        a2 = np.int32(0)
        a3 = np.int32(0)
        a4 = np.int32(0)
        a5 = np.int32(0)
        a6 = np.int32(0)
        a7 = np.int32(0)
        for l in range(32):
            a0 = np.int32(a0 + np.int32(w16[s, o + l]) * np.int32(aq[t, o + l]))
            a1 = np.int32(a1 + np.int32(w16[s, o + 32 + l]) * np.int32(aq[t, o + 32 + l]))
            a2 = np.int32(a2 + np.int32(w16[s, o + 64 + l]) * np.int32(aq[t, o + 64 + l]))
            a3 = np.int32(a3 + np.int32(w16[s, o + 96 + l]) * np.int32(aq[t, o + 96 + l]))
            a4 = np.int32(a4 + np.int32(w16[s, o + 128 + l]) * np.int32(aq[t, o + 128 + l]))
            a5 = np.int32(a5 + np.int32(w16[s, o + 160 + l]) * np.int32(aq[t, o + 160 + l]))
            a6 = np.int32(a6 + np.int32(w16[s, o + 192 + l]) * np.int32(aq[t, o + 192 + l]))
            a7 = np.int32(a7 + np.int32(w16[s, o + 224 + l]) * np.int32(aq[t, o + 224 + l]))
        s8 = 8 * g
        f += ad[t, g] * (dsc[s, s8] * np.float32(a0) + dsc[s, s8 + 1] * np.float32(a1)
                         + dsc[s, s8 + 2] * np.float32(a2) + dsc[s, s8 + 3] * np.float32(a3)
                         + dsc[s, s8 + 4] * np.float32(a4) + dsc[s, s8 + 5] * np.float32(a5)
                         + dsc[s, s8 + 6] * np.float32(a6) + dsc[s, s8 + 7] * np.float32(a7))
    # A row of 32 * (8n + m) values ends in m blocks of a partial activation block.
    for b in range(nb32 - nb32 % 8, nb32):
        acc = np.int32(0)
        for i in range(32):
            acc = np.int32(acc + np.int32(w16[s, b * 32 + i]) * np.int32(aq[t, b * 32 + i]))
        f += ad[t, b // 8] * dsc[s, b] * np.float32(acc)
    return f


@njit(inline="always", cache=True)
def dot_dense(w, e, r, x, t):
    """``w[e, r] . x[t]`` of two float32 rows (the dense fallback path)."""
    f = np.float32(0.0)
    for i in range(w.shape[2]):
        f += w[e, r, i] * x[t, i]
    return f

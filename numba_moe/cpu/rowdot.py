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
def dot_kquant(w16, dsc, dmins, with_mins, aq, ad, amb, nb):
    """``w . x`` for a K-quant row (Q4_K, Q5_K, Q6_K).

    Parameters
    ----------
    w16, dsc, dmins
        The decoded row (int16 [nb*256], float32 [nb], float32 [nb*8]).
    with_mins : bool
        Q4_K / Q5_K (subtract the min term); False for Q6_K.
    aq, ad, amb
        The quantized activation row: int16 [nb*256], float32 [nb],
        float32 [nb*8] (``ad * bsum`` per 32 values).
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
            acc = np.int32(acc + np.int32(w16[b * 256 + i]) * np.int32(aq[b * 256 + i]))
        f += ad[b] * dsc[b] * np.float32(acc)
    if with_mins:
        c = np.float32(0.0)
        for s in range(nb * 8):
            c += dmins[s] * amb[s]
        f -= c
    return f


@njit(inline="always", cache=True)
def dot_q8_0(w16, dsc, aq, ad, nb32):
    """``w . x`` for a Q8_0 row: ``nb32`` blocks of 32, one scale each.

    The activation scale ``ad`` is per 256 values (eight Q8_0 blocks).
    """
    f = np.float32(0.0)
    for b in range(nb32):
        acc = np.int32(0)
        for i in range(32):
            acc = np.int32(acc + np.int32(w16[b * 32 + i]) * np.int32(aq[b * 32 + i]))
        f += ad[b // 8] * dsc[b] * np.float32(acc)
    return f


@njit(inline="always", cache=True)
def dot_dense(w, x):
    """``w . x`` of two float32 rows (the dense fallback path)."""
    f = np.float32(0.0)
    for i in range(w.shape[0]):
        f += w[i] * x[i]
    return f

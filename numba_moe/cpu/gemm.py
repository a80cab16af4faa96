"""Grouped expert GEMMs over compressed GGUF blocks (CPU).

Two kernels, both ``prange`` over balanced runs of ``(expert, row tile)``
work items (:mod:`numba_moe.cpu.schedule`):

* :func:`grouped_gate_up`: for every slot ``p`` of expert ``e`` (token
  ``t = packed_token_idx[p]``) and every row ``r`` of the tile,
  ``h[p, r] = silu(gate_e[r] . x[t]) * (up_e[r] . x[t])``.  Gate and up rows
  are decoded together and dotted with each token row in one pass; SiLU and
  the product run in the epilogue, so ``h`` is written once.
* :func:`grouped_down`: ``y[p, r] = down_e[r] . h[p]``.

Each weight row is decoded once per forward into a per-thread int16 buffer
(:mod:`numba_moe.cpu.rowdecode`) and then applied to all of the expert's
tokens: at T=1 that is a GEMV streaming the blocks once, at large T a small
GEMM per expert whose decode cost is shared by every token.  Activations
are quantized per 256 values to 12-bit codes (:mod:`numba_moe.cpu.actquant`)
and the products are integer; no dequantized expert matrix ever exists.

Why integer and not float FMA: on the CI machine (2 threads, AVX-512 VNNI)
a Q4_K gate projection at T=1 (8 experts x 768 x 2048) took 2.2 ms single
threaded with a dequantize-in-registers float32 path against 1.2 ms with
int16 codes (``vpmovzxbw`` + ``vpmullw`` decode, ``vpdpwssd`` dot), and the
int16 dot retires twice the multiply-adds per instruction of a float32 FMA
at large T.  The cost is activation rounding: outputs match float64 to
about 1e-3 relative (tests bound it by 5e-3).

Experts with few tokens skip the decode buffer (:func:`_direct`).  On
AVX-512 hosts, Q4_K and Q6_K rows go through the explicit-vector dots of
:mod:`numba_moe.cpu.simd`: straight from the blocks for experts with at most
:data:`DIRECT_MAX_TOKENS` tokens, decode + dot for the others, both rounding
identically; decoded rows go two rows times two tokens at a time.  Whole
forward on the CI machine (``benchmarks/bench_cpu.py``, Qwen3-30B-A3B
layer, against the portable kernels of the previous release): T=1 1.8 ->
1.2 ms, T=4 7.9 -> 4.6, T=16 25.7 -> 17.9, T=64 70 -> 57, T=512 415 -> 256.
The portable kernels take the direct form for Q4_K in one-token forwards
only (:mod:`numba_moe.cpu.blockdot`).

Types without a native decoder (F32, F16, Q4_0, ...) take the dense path:
``ExpertTensor.dense()`` float32 rows dotted with the float32 activations
(exact to float32 rounding).  Gate, up and down choose their path
independently.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import gguf
import numpy as np
from numba import get_num_threads, njit, prange

from ..errors import MoEError
from ..experts import ExpertTensor
from ..threading_guard import parallel_launch
from .actquant import quantize_rows
from .blockdot import dot_row_q4_k
from .rowdecode import decode_row_q4_k, decode_row_q5_k, decode_row_q6_k, decode_row_q8_0
from .rowdot import dot_dense, dot_kquant, dot_q8_0
from .schedule import max_items, schedule_items
from .simd import (dot_decoded_2x2_avx512, dot_decoded_avx512, dot_row_q4_k_avx512,
                   dot_row_q6_k_avx512, q4_k_order_into, simd_flag)

__all__ = ["Projection", "projection", "grouped_gate_up", "grouped_down", "TILE_ROWS",
           "decode_buffers"]

Q = gguf.GGMLQuantizationType

# Kernel type codes: the GGML ids of the native types, -1 for the dense path.
QT_DENSE = -1
QT_Q8_0 = int(Q.Q8_0)
QT_Q4_K = int(Q.Q4_K)
QT_Q5_K = int(Q.Q5_K)
QT_Q6_K = int(Q.Q6_K)
_NATIVE_CODES = {Q.Q8_0: QT_Q8_0, Q.Q4_K: QT_Q4_K, Q.Q5_K: QT_Q5_K, Q.Q6_K: QT_Q6_K}

#: Output rows per work item.
TILE_ROWS = 16
# Down rows decoded together before the token loop, so each activation row
# is loaded once per group and reused by every row of it (2x faster at
# T=512 than one row at a time).  The same grouping measured slower for
# gate/up (two 4 KiB rows per output row already), which decodes one row of
# each at a time.
_GROUP_DOWN = 4
_SCRATCH_SLOTS = 4
#: AVX-512 path: experts with at most this many tokens skip the decode buffer.
DIRECT_MAX_TOKENS = 3
# One row decode costs about two token dot products (see schedule.py).
_DECODE_WEIGHT = 2

# reassoc: lets the float reductions (dense dot, min correction, block sums)
# vectorize; contract: FMA.  Neither changes NaN/Inf propagation.
_FASTMATH = {"reassoc", "contract"}

_NO_Q = np.zeros((0, 0, 0), dtype=np.uint8)
_NO_Q32 = np.zeros((0, 0, 0), dtype=np.uint32)
_NO_F = np.zeros((0, 0, 0), dtype=np.float32)
for _a in (_NO_Q, _NO_Q32, _NO_F):
    _a.flags.writeable = False


class Projection(NamedTuple):
    """One stacked projection as the kernels take it.

    Attributes
    ----------
    qt : int
        Kernel type code (GGML id of a native type, or -1: dense).
    q : ndarray of uint8, shape (E, rows_total, row_bytes)
        Native blocks (read-only view), or an empty array on the dense path.
    q32 : ndarray of uint32, shape (E, rows_total, row_bytes / 4)
        The same bytes as words, for Q4_K / Q5_K scale unpacking (their
        blocks are 144 / 176 bytes); an empty array for other types.
    f : ndarray of float32, shape (E, rows_total, cols)
        Dense weights (read-only view), or an empty array on the native path.
    row0 : int
        First row of this projection inside ``q`` / ``f`` (the up half of a
        fused ``ffn_gate_up_exps`` starts at I).
    rows, cols, num_experts : int
    name : str
    """

    qt: int
    q: np.ndarray
    q32: np.ndarray
    f: np.ndarray
    row0: int
    rows: int
    cols: int
    num_experts: int
    name: str


def _readonly(a: np.ndarray) -> np.ndarray:
    # One Numba specialization for file maps (read-only) and test arrays alike.
    v = np.asarray(a).view()
    v.flags.writeable = False
    return v


def projection(t: ExpertTensor, fused: Optional[ExpertTensor] = None, row0: int = 0) -> Projection:
    """Kernel arguments for ExpertTensor ``t``.

    Parameters
    ----------
    t : ExpertTensor
        The projection (E, rows, cols).
    fused : ExpertTensor, optional
        The (E, 2*rows, cols) tensor ``t`` is a half of; the kernels then
        read the fused tensor (contiguous) at row offset ``row0``.
    row0 : int
        Offset of ``t``'s rows inside ``fused``.

    Returns
    -------
    Projection
    """
    src = t if fused is None else fused
    if fused is None:
        row0 = 0
    if t.native:
        data = src.data
        if data.ndim != 3 or not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        q = _readonly(data)
        q32 = _readonly(q.view(np.uint32)) if t.qtype in (Q.Q4_K, Q.Q5_K) else _NO_Q32
        return Projection(_NATIVE_CODES[t.qtype], q, q32, _NO_F, row0, t.rows, t.cols,
                          t.num_experts, t.name)
    dense = src.dense()
    if not dense.flags.c_contiguous:
        dense = np.ascontiguousarray(dense)
    return Projection(QT_DENSE, _NO_Q, _NO_Q32, _readonly(dense), row0, t.rows, t.cols,
                      t.num_experts, t.name)


# --------------------------------------------------------------------------
# per-row dispatch (inlined into the kernels)
# --------------------------------------------------------------------------

@njit(inline="always", cache=True)
def _direct(qt, tokens, single_token, simd):
    """Whether an expert's rows are dotted straight from the blocks (no decode
    buffer); ``tokens``: its slot count.

    Only pays when each row is used by few tokens (see
    :mod:`numba_moe.cpu.blockdot`).  Portable kernels: Q4_K in one-token
    forwards only, chosen per call and not per expert, because their two
    paths round differently and a token's output must not depend on which
    other tokens share the batch.  AVX-512 (``simd`` not None): Q4_K and
    Q6_K experts with at most :data:`DIRECT_MAX_TOKENS` tokens, in any
    forward, since :mod:`numba_moe.cpu.simd` rounds its direct and decoded
    forms identically.
    """
    if simd is None:
        return single_token and qt == QT_Q4_K
    return (qt == QT_Q4_K or qt == QT_Q6_K) and tokens <= DIRECT_MAX_TOKENS


@njit(inline="always", cache=True)
def _decode(qt, direct, q, q32, e, row, cols, w16, dsc, dmins, s):
    """Decode row ``row`` of expert ``e`` into buffer row ``s`` (no-op when
    dense or ``direct``)."""
    if direct:
        return
    if qt == QT_Q4_K:
        decode_row_q4_k(q, q32, e, row, cols // 256, w16, dsc, dmins, s)
    elif qt == QT_Q5_K:
        decode_row_q5_k(q, q32, e, row, cols // 256, w16, dsc, dmins, s)
    elif qt == QT_Q6_K:
        decode_row_q6_k(q, e, row, cols // 256, w16, dsc, s)
    elif qt == QT_Q8_0:
        decode_row_q8_0(q, e, row, cols // 32, w16, dsc, s)


@njit(inline="always", cache=True)
def _dot(qt, direct, simd, q, q32, f, e, row, cols, w16, dsc, dmins, s, aq, ad, amb, ap, xf, t):
    """Row ``row`` of expert ``e`` (decoded in buffer row ``s``; the blocks
    when ``direct``; dense) times activation row ``t`` (codes ``aq``; ``ap``
    the same in :data:`~numba_moe.cpu.simd.Q4_K_ORDER`)."""
    if direct:
        # simd is None is resolved at compile time: the portable
        # specialization never types the AVX-512 intrinsics.
        if simd is None:
            return dot_row_q4_k(q, q32, e, row, cols // 256, aq, ad, amb, t)
        if qt == QT_Q4_K:
            return dot_row_q4_k_avx512(q, e, row, cols // 256, ap, ad, amb, t)
        return dot_row_q6_k_avx512(q, e, row, cols // 256, aq, ad, t)
    if qt == QT_DENSE:
        return dot_dense(f, e, row, xf, t)
    if qt == QT_Q8_0:
        return dot_q8_0(w16, dsc, s, aq, ad, t, cols // 32)
    if simd is not None and (qt == QT_Q4_K or qt == QT_Q6_K):
        return dot_decoded_avx512(w16, dsc, dmins, s, qt == QT_Q4_K, aq, ad, amb, t, cols // 256)
    return dot_kquant(w16, dsc, dmins, s, qt != QT_Q6_K, aq, ad, amb, t, cols // 256)


@njit(inline="always", cache=True)
def _paired(qt, direct, simd):
    """Whether decoded rows of type ``qt`` go through the AVX-512 2x2 tile
    (:func:`~numba_moe.cpu.simd.dot_decoded_2x2_avx512`): two rows times two
    tokens per pass, the same bits as four single dots."""
    return simd is not None and not direct and (qt == QT_Q4_K or qt == QT_Q6_K)


@njit(inline="always", cache=True)
def _silu_mul(g, u):
    """``silu(g) * u``: one definition for every call site, so that a slot's
    value does not depend on which loop computed it."""
    return g / (np.float32(1.0) + np.exp(-g)) * u


# --------------------------------------------------------------------------
# parallel kernels
# --------------------------------------------------------------------------

@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _gate_up_kernel(items, bounds, expert_offsets, token_of_slot, qts, qs, q32s, fs, row0s,
                    cols, xq, xd, xmb, xp, xf, h, w16, dsc, dmins, single_token, simd):
    """``h[p, r] = silu(gate . x[t]) * (up . x[t])`` over the scheduled items.

    ``qts``, ``qs``, ``q32s``, ``fs``, ``row0s`` are (gate, up) pairs of the
    :class:`Projection` fields.  ``prange`` runs one balanced run of items
    per iteration; run ``k`` uses scratch row ``k`` of ``w16`` / ``dsc`` /
    ``dmins`` ([nbins, slots, ...]), and items own disjoint (slot range, row
    range) blocks of ``h``.  Gate and up go through one call site of each
    helper (a loop over the pair), which halves the inlined code and the
    compile time.  ``single_token``: a one-token forward, whose Q4_K rows are
    dotted straight from the blocks (:func:`_direct`).  ``simd``: None
    (portable kernels) or True (AVX-512 dots, :func:`simd_flag`), which read
    Q4_K blocks against ``xp``, the codes ``xq`` in
    :data:`~numba_moe.cpu.simd.Q4_K_ORDER`.
    """
    nbins = bounds.shape[0] - 1
    for k in prange(nbins):
        # The thread's decode buffers ([slots, ...] views made once here:
        # inside the loops, every view is an atomic reference-count update).
        wk = w16[k]
        dk = dsc[k]
        mk = dmins[k]
        for it in range(bounds[k], bounds[k + 1]):
            e = items[it, 0]
            p0 = expert_offsets[e]
            p1 = expert_offsets[e + 1]
            direct = (_direct(qts[0], p1 - p0, single_token, simd),
                      _direct(qts[1], p1 - p0, single_token, simd))
            for r in range(items[it, 1], items[it, 2]):
                for j in range(2):
                    _decode(qts[j], direct[j], qs[j], q32s[j], e, row0s[j] + r, cols, wk, dk, mk, j)
                p = p0
                if _paired(qts[0], direct[0], simd) and qts[1] == qts[0] and not direct[1]:
                    # Gate and up rows (buffer slots 0, 1) times two tokens at a time.
                    while p + 1 < p1:
                        gu = dot_decoded_2x2_avx512(wk, dk, mk, 0, 1, qts[0] == QT_Q4_K, xq, xd,
                                                    xmb, token_of_slot[p], token_of_slot[p + 1],
                                                    cols // 256)
                        h[p, r] = _silu_mul(gu[0], gu[2])
                        h[p + 1, r] = _silu_mul(gu[1], gu[3])
                        p += 2
                for p in range(p, p1):
                    t = token_of_slot[p]
                    g = np.float32(0.0)
                    u = np.float32(0.0)
                    for j in range(2):
                        v = _dot(qts[j], direct[j], simd, qs[j], q32s[j], fs[j], e, row0s[j] + r,
                                 cols, wk, dk, mk, j, xq, xd, xmb, xp, xf, t)
                        if j == 0:
                            g = v
                        else:
                            u = v
                    h[p, r] = _silu_mul(g, u)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _down_kernel(items, bounds, expert_offsets, qt, q, q32, f, row0, cols, hq, hd, hmb, hp, hf,
                 y, w16, dsc, dmins, single_token, simd):
    """``y[p, r] = down_e[r] . h[p]`` over the scheduled items (see :func:`_gate_up_kernel`)."""
    nbins = bounds.shape[0] - 1
    for k in prange(nbins):
        wk = w16[k]
        dk = dsc[k]
        mk = dmins[k]
        for it in range(bounds[k], bounds[k + 1]):
            e = items[it, 0]
            p0 = expert_offsets[e]
            p1 = expert_offsets[e + 1]
            direct = _direct(qt, p1 - p0, single_token, simd)
            r1 = items[it, 2]
            for rg in range(items[it, 1], r1, _GROUP_DOWN):
                nr = min(_GROUP_DOWN, r1 - rg)
                for i in range(nr):
                    _decode(qt, direct, q, q32, e, row0 + rg + i, cols, wk, dk, mk, i)
                p = p0
                if _paired(qt, direct, simd) and nr % 2 == 0:
                    # Two rows times two slots at a time.
                    while p + 1 < p1:
                        for i in range(0, nr, 2):
                            v = dot_decoded_2x2_avx512(wk, dk, mk, i, i + 1, qt == QT_Q4_K, hq, hd,
                                                       hmb, p, p + 1, cols // 256)
                            y[p, rg + i] = v[0]
                            y[p + 1, rg + i] = v[1]
                            y[p, rg + i + 1] = v[2]
                            y[p + 1, rg + i + 1] = v[3]
                        p += 2
                for p in range(p, p1):
                    for i in range(nr):
                        y[p, rg + i] = _dot(qt, direct, simd, q, q32, f, e, row0 + rg + i, cols,
                                            wk, dk, mk, i, hq, hd, hmb, hp, hf, p)


# --------------------------------------------------------------------------
# public wrappers
# --------------------------------------------------------------------------

def decode_buffers(nbins: int, max_cols: int):
    """Per-thread decode scratch ``(w16, dsc, dmins)`` for rows up to ``max_cols``."""
    return (np.zeros((nbins, _SCRATCH_SLOTS, max_cols), dtype=np.int16),
            np.zeros((nbins, _SCRATCH_SLOTS, max_cols // 32 + 1), dtype=np.float32),
            np.zeros((nbins, _SCRATCH_SLOTS, max_cols // 32 + 1), dtype=np.float32))


def _check_plan(expert_offsets, packed_token_idx, num_experts, num_tokens):
    off = np.asarray(expert_offsets)
    if off.dtype != np.int64 or off.shape != (num_experts + 1,) or not off.flags.c_contiguous:
        raise MoEError(f"expert_offsets: expected a C-contiguous int64 array [{num_experts + 1}]")
    if off[0] != 0 or np.any(np.diff(off) < 0):
        raise MoEError("expert_offsets: expected non-decreasing prefix sums starting at 0")
    pairs = int(off[-1])
    if packed_token_idx is not None:
        idx = packed_token_idx
        if not (isinstance(idx, np.ndarray) and idx.dtype == np.int32 and idx.ndim == 1
                and idx.shape[0] >= pairs and idx.flags.c_contiguous):
            raise MoEError(f"packed_token_idx: expected a C-contiguous int32 array [>= {pairs}]")
        if pairs and (idx[:pairs].min() < 0 or idx[:pairs].max() >= num_tokens):
            raise MoEError(f"packed_token_idx: token index out of range [0, {num_tokens})")
    return pairs


def _check_rows(name, a, cols):
    if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 2
            and a.shape[1] == cols and a.flags.c_contiguous):
        raise MoEError(f"{name}: expected a C-contiguous float32 array [n, {cols}]")


def _schedule(expert_offsets, rows, nbins):
    items = np.empty((max_items(expert_offsets.shape[0] - 1, rows, TILE_ROWS), 3), dtype=np.int64)
    bounds = np.empty(nbins + 1, dtype=np.int64)
    schedule_items(expert_offsets, rows, TILE_ROWS, _DECODE_WEIGHT, nbins, items, bounds)
    return items, bounds


def _as_projection(t, what):
    if isinstance(t, Projection):
        return t
    if isinstance(t, ExpertTensor):
        return projection(t)
    raise MoEError(f"{what}: expected an ExpertTensor, got {type(t).__name__}")


def _work_runs(num_threads) -> int:
    """Validated ``num_threads`` argument (None: Numba's thread count)."""
    if num_threads is None:
        return get_num_threads()
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) \
            or num_threads < 1:
        raise MoEError(f"num_threads={num_threads!r}: expected an integer >= 1")
    return int(num_threads)


def grouped_gate_up(gate, up, x, expert_offsets, packed_token_idx, out=None, num_threads=None):
    """``h[p] = silu(x[t] @ gate_e.T) * (x[t] @ up_e.T)`` for every slot of a plan.

    Parameters
    ----------
    gate, up : ExpertTensor or Projection
        (E, I, H) each.
    x : ndarray of float32, shape (T, H), C-contiguous
        Token rows.
    expert_offsets : ndarray of int64, shape (E + 1,)
        Slot ranges per expert (``BucketPlan.expert_offsets``).
    packed_token_idx : ndarray of int32, shape (>= P,)
        Token of each slot; ``P = expert_offsets[-1]``.
    out : ndarray of float32, shape (>= P, I), optional
        Receives ``h`` (every row ``< P`` is assigned).
    num_threads : int, optional
        Work runs (default ``numba.get_num_threads()``).

    Returns
    -------
    ndarray of float32, shape (P, I)
        ``out[:P]`` (a view when ``out`` is given).

    Notes
    -----
    With one token row, Q4_K rows are dotted straight from their blocks
    (:mod:`numba_moe.cpu.blockdot`); the result differs from the batched
    path by float rounding only.
    """
    g = _as_projection(gate, "gate")
    u = _as_projection(up, "up")
    if (g.num_experts, g.rows, g.cols) != (u.num_experts, u.rows, u.cols):
        raise MoEError(f"gate {g.name} and up {u.name} have different shapes")
    _check_rows("x", x, g.cols)
    pairs = _check_plan(expert_offsets, packed_token_idx, g.num_experts, x.shape[0])
    if out is None:
        out = np.empty((pairs, g.rows), dtype=np.float32)
    elif not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.ndim == 2
              and out.shape[0] >= pairs and out.shape[1] == g.rows and out.flags.c_contiguous):
        raise MoEError(f"out: expected a C-contiguous float32 array [>= {pairs}, {g.rows}]")
    nbins = _work_runs(num_threads)
    if g.qt == QT_DENSE and u.qt == QT_DENSE:
        xq, xd, xmb = _unquantized(x)
    else:
        xq, xd, xmb = quantize_rows(x)
    simd = simd_flag()
    xp = _ordered_codes(xq, x.shape[0], simd, (g.qt, u.qt))
    items, bounds = _schedule(expert_offsets, g.rows, nbins)
    w16, dsc, dmins = decode_buffers(nbins, g.cols)
    with parallel_launch():
        _gate_up_kernel(items, bounds, expert_offsets, packed_token_idx, (g.qt, u.qt),
                        (g.q, u.q), (g.q32, u.q32), (g.f, u.f), (g.row0, u.row0), g.cols,
                        xq, xd, xmb, xp, x, out, w16, dsc, dmins, x.shape[0] == 1, simd)
    return out[:pairs]


def grouped_down(down, h, expert_offsets, out=None, num_threads=None):
    """``y[p] = h[p] @ down_e.T`` for every slot ``p`` of expert ``e``.

    Parameters
    ----------
    down : ExpertTensor or Projection
        (E, H, I).
    h : ndarray of float32, shape (>= P, I), C-contiguous
        Slot rows (the output of :func:`grouped_gate_up`).
    expert_offsets : ndarray of int64, shape (E + 1,)
    out : ndarray of float32, shape (>= P, H), optional
    num_threads : int, optional

    Returns
    -------
    ndarray of float32, shape (P, H)
    """
    d = _as_projection(down, "down")
    _check_rows("h", h, d.cols)
    pairs = _check_plan(expert_offsets, None, d.num_experts, 0)
    if h.shape[0] < pairs:
        raise MoEError(f"h: expected at least {pairs} rows, got {h.shape[0]}")
    if out is None:
        out = np.empty((pairs, d.rows), dtype=np.float32)
    elif not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.ndim == 2
              and out.shape[0] >= pairs and out.shape[1] == d.rows and out.flags.c_contiguous):
        raise MoEError(f"out: expected a C-contiguous float32 array [>= {pairs}, {d.rows}]")
    nbins = _work_runs(num_threads)
    hq, hd, hmb = _unquantized(h) if d.qt == QT_DENSE else quantize_rows(h, pairs)
    simd = simd_flag()
    hp = _ordered_codes(hq, pairs, simd, (d.qt,))
    items, bounds = _schedule(expert_offsets, d.rows, nbins)
    w16, dsc, dmins = decode_buffers(nbins, d.cols)
    with parallel_launch():
        _down_kernel(items, bounds, expert_offsets, d.qt, d.q, d.q32, d.f, d.row0, d.cols, hq,
                     hd, hmb, hp, h, out, w16, dsc, dmins, pairs == 1, simd)
    return out[:pairs]


def _ordered_codes(aq, n, simd, qts):
    """Codes ``aq[:n]`` in :data:`~numba_moe.cpu.simd.Q4_K_ORDER` when the
    AVX-512 kernels will read Q4_K blocks; ``aq`` itself (unread) otherwise."""
    if simd is None or QT_Q4_K not in qts:
        return aq
    out = np.empty_like(aq)
    q4_k_order_into(aq, n, out)
    return out


def _unquantized(x):
    """Placeholder activation codes for a dense-only projection (never read)."""
    n, c = x.shape
    return (np.zeros((n, c), dtype=np.int16), np.zeros((n, (c + 255) // 256), dtype=np.float32),
            np.zeros((n, c // 32 + 1), dtype=np.float32))

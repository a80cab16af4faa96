"""Grouped expert GEMMs over quantized blocks: a GEMV kernel and a tiled one.

Both compute, for every active expert e and every slot s of e,

* ``gate_up`` mode: ``out[s, r] = silu(G_e[r] . x[tok(s)]) * (U_e[r] . x[tok(s)])``
  (gate, up and the activation fused; ``tok(s) = packed_token_idx[s]``, so the
  token rows are gathered by indirection, never copied);
* ``plain`` mode: ``out[s, r] = W_e[r] . x[s]`` (``x`` already per slot).

The weights are decoded chunk by chunk in registers (:mod:`.decoders`);
nothing is dequantized to memory.

*GEMV kernel* (few tokens per expert): grid ``(expert slot, row block)``;
a block serves one expert.  A group of ``segw`` lanes owns a weight row (two
rows per group: gate and up, or two consecutive rows); lane ``i`` of a group
walks chunks ``i, i + segw, ...`` and keeps the decoded chunk in registers
while it loops over up to :data:`TOKENS_PER_PASS` tokens, so each expert's
rows are read from memory once per pass for all its tokens.

*Tiled kernel* (many tokens per expert): one block computes a
``tile_m x tile_n`` output tile of one expert from vLLM-style padded blocks
(:func:`numba_moe.cuda.plan.plan_device`); each 32-value chunk of the
weight tile is decoded into shared memory once and reused by ``tile_m``
token rows.  Plain FMA (SIMT) arithmetic in float32.
"""
from __future__ import annotations

import math

from numba import cuda, float32, int64

from .decoders import QInfo
from .primitives import device_inline, load4, seg_sum

__all__ = ["TOKENS_PER_PASS", "gemv_kernel", "tiled_kernel", "MICRO"]

#: Tokens the GEMV kernel serves per pass over an expert's weights.
TOKENS_PER_PASS = 8
#: Rows and columns of the per-thread output micro-tile of the tiled kernel.
MICRO = 4
# Weight rows a GEMV lane group decodes at once (gate + up, or 2 rows).
_RW = 2

_cache = {}
# exp(80) is finite in float32; below -80, silu(g) is 0 to float32 precision
_EXP_CLAMP = float32(80)


@device_inline
def _silu(g):
    return g / (float32(1) + math.exp(min(-g, _EXP_CLAMP)))


def gemv_kernel(qi: QInfo, gate_up: bool, warps: int):
    """The GEMV kernel for weights of type ``qi`` (compiled per argument types).

    Signature::

        kernel[(n_expert_slots, row_blocks), 32 * warps, stream](
            wa, wb, wc, wd, va, vb, vc, vd, nb, n_chunks, rows, segw,
            x, num_slots, active, meta, offsets, packed_token_idx, out)

    ``w*`` gate (or plain) planes, ``v*`` up planes (ignored in plain mode);
    ``segw`` lanes per row (a power of two <= 32); ``x`` float32 flat
    ``[*, n_chunks * 32]``; ``active[j]`` the j-th expert with pairs and
    ``meta[0]`` their count; ``offsets`` [E+1] slot ranges (clamped to
    ``num_slots``); ``out`` float32 flat ``[slots, rows]``.
    """
    key = ("gemv", qi.qtype, gate_up, warps)
    if key not in _cache:
        _cache[key] = _make_gemv(qi, gate_up, warps)
    return _cache[key]


def _make_gemv(qi: QInfo, gate_up: bool, warps: int):
    nseg, seglen = qi.nseg, qi.seglen
    decode, seg_col = qi.decode, qi.seg_col
    tb_n = TOKENS_PER_PASS
    rw = _RW
    r_out = 1 if gate_up else _RW
    n_q, n_ab, n_acc = 32 * rw, 8 * rw, rw * tb_n
    gate_up_mode = gate_up

    @cuda.jit
    def kernel(wa, wb, wc, wd, va, vb, vc, vd, nb, n_chunks, rows, segw,
               x, num_slots, active, meta, offsets, packed, out):
        j = cuda.blockIdx.x
        if j >= meta[0]:
            return
        e = active[j]
        start = offsets[e]
        end = min(offsets[e + 1], num_slots)
        tid = cuda.threadIdx.x
        lane = tid & 31
        lis = lane & (segw - 1)
        groups = 32 // segw
        r0 = ((cuda.blockIdx.y * warps + (tid >> 5)) * groups + lane // segw) * r_out
        cols = n_chunks * 32
        erow = e * rows
        q = cuda.local.array(n_q, float32)
        ab = cuda.local.array(n_ab, float32)
        acc = cuda.local.array(n_acc, float32)
        dot = cuda.local.array(rw, float32)
        for tok0 in range(start, end, tb_n):
            nt = min(tb_n, end - tok0)
            for i in range(rw * tb_n):
                acc[i] = float32(0)
            c = lis
            while c < n_chunks:
                for rr in range(rw):
                    r = r0 if gate_up_mode else r0 + rr
                    if r < rows:
                        if gate_up_mode and rr == 1:
                            decode(va, vb, vc, vd, erow + r, c, nb, q, 32 * rr, ab, 8 * rr)
                        else:
                            decode(wa, wb, wc, wd, erow + r, c, nb, q, 32 * rr, ab, 8 * rr)
                    else:
                        for i in range(32):
                            q[32 * rr + i] = float32(0)
                        for i in range(8):
                            ab[8 * rr + i] = float32(0)
                for tb in range(tb_n):
                    if tb < nt:
                        slot = tok0 + tb
                        xrow = packed[slot] if gate_up_mode else slot
                        xbase = xrow * cols
                        for s in range(nseg):
                            col = xbase + seg_col(c, s)
                            sx = float32(0)
                            dot[0] = float32(0)
                            dot[1] = float32(0)
                            for v in range(seglen // 4):
                                x0, x1, x2, x3 = load4(x, col + 4 * v)
                                sx += (x0 + x1) + (x2 + x3)
                                for rr in range(rw):
                                    o = 32 * rr + s * seglen + 4 * v
                                    dot[rr] += (q[o] * x0 + q[o + 1] * x1
                                                + q[o + 2] * x2 + q[o + 3] * x3)
                            for rr in range(rw):
                                acc[rr * tb_n + tb] += (ab[8 * rr + s] * dot[rr]
                                                        - ab[8 * rr + 4 + s] * sx)
                c += segw
            for tb in range(tb_n):
                if tb < nt:
                    g = seg_sum(acc[tb], segw)
                    u = seg_sum(acc[tb_n + tb], segw)
                    slot = tok0 + tb
                    if lis == 0 and r0 < rows:
                        if gate_up_mode:
                            out[slot * rows + r0] = _silu(g) * u
                        else:
                            out[slot * rows + r0] = g
                            if r0 + 1 < rows:
                                out[slot * rows + r0 + 1] = u

    return kernel


def gemv_layout(rows: int, n_chunks: int, gate_up: bool, warps: int):
    """``(segw, row_blocks)`` of the GEMV launch for weights with ``rows``
    rows of ``n_chunks`` chunks."""
    segw = 1
    while segw < min(n_chunks, 32):
        segw <<= 1
    rows_per_block = warps * (32 // segw) * (1 if gate_up else _RW)
    return segw, -(-rows // rows_per_block)


def tiled_kernel(qi: QInfo, gate_up: bool, tile_m: int, tile_n: int):
    """The tiled kernel for weights of type ``qi``.

    Signature::

        kernel[(m_blocks, n_blocks), (tile_m // 4) * (tile_n // 4), stream](
            wa, wb, wc, wd, va, vb, vc, vd, nb, n_chunks, rows,
            x, num_pairs, top_k, sorted_ids, block_expert, meta,
            pairs_by_token, out)

    Block ``mb`` computes rows ``sorted_ids[mb*tile_m : (mb+1)*tile_m]`` (pair
    indices; ``>= num_pairs`` is padding) of expert ``block_expert[mb]``, and
    exits when ``mb * tile_m >= meta[1]``.  Input row of pair ``p``: token
    ``p // top_k`` (gate_up) or slot ``pairs_by_token[p]`` (plain); output
    row: that slot.
    """
    key = ("tiled", qi.qtype, gate_up, tile_m, tile_n)
    if key not in _cache:
        _cache[key] = _make_tiled(qi, gate_up, tile_m, tile_n)
    return _cache[key]


def _make_tiled(qi: QInfo, gate_up: bool, bm: int, bn: int):
    nseg, seglen = qi.nseg, qi.seglen
    decode, seg_col = qi.decode, qi.seg_col
    tm = tn = MICRO
    ty_n = bm // tm
    tx_n = bn // tn
    nthreads = ty_n * tx_n
    rw = 2 if gate_up else 1
    wn = rw * bn
    n_acc = 2 * tm * tn
    n_bv = 2 * tn
    gate_up_mode = gate_up

    @cuda.jit
    def kernel(wa, wb, wc, wd, va, vb, vc, vd, nb, n_chunks, rows,
               x, num_pairs, top_k, sorted_ids, block_expert, meta, pairs_by_token, out):
        mb = cuda.blockIdx.x
        if mb * bm >= meta[1]:
            return
        e = block_expert[mb]
        n0 = cuda.blockIdx.y * bn
        tid = cuda.threadIdx.x
        ty = tid // tx_n
        tx = tid % tx_n
        a_s = cuda.shared.array((32, bm), float32)
        w_s = cuda.shared.array((32, wn), float32)
        xrow_s = cuda.shared.array(bm, dtype=int64)
        orow_s = cuda.shared.array(bm, dtype=int64)
        for m in range(tid, bm, nthreads):
            p = sorted_ids[mb * bm + m]
            if p < num_pairs:
                slot = pairs_by_token[p]
                xrow_s[m] = p // top_k if gate_up_mode else slot
                orow_s[m] = slot
            else:
                xrow_s[m] = -1
                orow_s[m] = -1
        cuda.syncthreads()
        cols = n_chunks * 32
        erow = e * rows
        acc = cuda.local.array(n_acc, float32)
        for i in range(rw * tm * tn):
            acc[i] = float32(0)
        q = cuda.local.array(32, float32)
        ab = cuda.local.array(8, float32)
        av = cuda.local.array(tm, float32)
        bv = cuda.local.array(n_bv, float32)
        for c in range(n_chunks):
            for idx in range(tid, bm * 8, nthreads):
                m = idx >> 3
                k = (idx & 7) * 4
                xr = xrow_s[m]
                if xr >= 0:
                    s = k // seglen
                    x0, x1, x2, x3 = load4(x, xr * cols + seg_col(c, s) + k - s * seglen)
                else:
                    x0 = x1 = x2 = x3 = float32(0)
                a_s[k, m] = x0
                a_s[k + 1, m] = x1
                a_s[k + 2, m] = x2
                a_s[k + 3, m] = x3
            for wr in range(tid, wn, nthreads):
                half = wr // bn
                r = n0 + wr - half * bn
                if r < rows:
                    if gate_up_mode and half == 1:
                        decode(va, vb, vc, vd, erow + r, c, nb, q, 0, ab, 0)
                    else:
                        decode(wa, wb, wc, wd, erow + r, c, nb, q, 0, ab, 0)
                    for s in range(nseg):
                        a = ab[s]
                        b = ab[4 + s]
                        for i in range(seglen):
                            w_s[s * seglen + i, wr] = a * q[s * seglen + i] - b
                else:
                    for i in range(32):
                        w_s[i, wr] = float32(0)
            cuda.syncthreads()
            for k in range(32):
                for i in range(tm):
                    av[i] = a_s[k, ty + i * ty_n]
                for jj in range(rw * tn):
                    half = jj // tn
                    bv[jj] = w_s[k, half * bn + tx + (jj - half * tn) * tx_n]
                for i in range(tm):
                    for jj in range(rw * tn):
                        acc[i * rw * tn + jj] += av[i] * bv[jj]
            cuda.syncthreads()
        for i in range(tm):
            orow = orow_s[ty + i * ty_n]
            if orow >= 0:
                for jj in range(tn):
                    n = n0 + tx + jj * tx_n
                    if n < rows:
                        g = acc[i * rw * tn + jj]
                        if gate_up_mode:
                            u = acc[i * rw * tn + tn + jj]
                            g = _silu(g) * u
                        out[orow * rows + n] = g

    return kernel


def tiled_layout(rows: int, tile_m: int, tile_n: int):
    """``(threads, n_blocks)`` of the tiled launch for ``rows`` output rows."""
    return (tile_m // MICRO) * (tile_n // MICRO), -(-rows // tile_n)

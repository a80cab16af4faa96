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
from .primitives import kernel as kernel_jit

__all__ = ["TOKENS_PER_PASS", "gemv_kernel", "gemv_layout", "tiled_kernel", "tiled_layout",
           "MICRO"]

#: Tokens the GEMV kernel serves per pass over an expert's weights.
TOKENS_PER_PASS = 4
#: Largest GEMV block (its register budget is ``CUDA_LAUNCH.gemv_min_blocks``).
GEMV_MAX_THREADS = 256
# Blocks the GEMV grid aims for: two per multiprocessor of an H100.
_TARGET_BLOCKS = 264
#: Rows and columns of the per-thread output micro-tile of the tiled kernel.
MICRO = 4

_cache = {}
# exp(80) is finite in float32; below -80, silu(g) is 0 to float32 precision
_EXP_CLAMP = float32(80)


@device_inline
def _silu(g):
    return g / (float32(1) + math.exp(min(-g, _EXP_CLAMP)))


def gemv_kernel(qi: QInfo, gate_up: bool):
    """The GEMV kernel for weights of type ``qi`` (compiled per argument types).

    Signature::

        kernel[(n_expert_slots, row_blocks, token_splits), 32 * warps, stream](
            wa, wb, wc, wd, va, vb, vc, vd, nb, n_chunks, rows, segw,
            x, num_slots, active, meta, offsets, packed_token_idx, out)

    Block ``(j, y, z)`` serves expert ``active[j]``, row block ``y``, and the
    passes of :data:`TOKENS_PER_PASS` tokens numbered ``z``, ``z + splits``, ...
    ``w*`` gate (or plain) planes, ``v*`` up planes (ignored in plain mode);
    ``segw`` lanes per row (a power of two <= 32); ``x`` float32 flat
    ``[*, n_chunks * 32]``; ``active[j]`` the j-th expert with pairs and
    ``meta[0]`` their count; ``offsets`` [E+1] slot ranges (clamped to
    ``num_slots``); ``out`` float32 flat ``[slots, rows]``; at most
    :data:`GEMV_MAX_THREADS` threads a block.
    """
    from ..config import CUDA_LAUNCH

    key = ("gemv", qi.qtype, gate_up, CUDA_LAUNCH.gemv_min_blocks)
    if key not in _cache:
        _cache[key] = _make_gemv(qi, gate_up, CUDA_LAUNCH.gemv_min_blocks)
    return _cache[key]


def _make_gemv(qi: QInfo, gate_up: bool, min_blocks: int):
    nseg, seglen = qi.nseg, qi.seglen
    fetch, affine, values4, seg_col = qi.fetch, qi.affine, qi.values4, qi.seg_col
    tb_n = TOKENS_PER_PASS
    n_acc = 2 * tb_n
    r_out = 1 if gate_up else 2
    gate_up_mode = gate_up

    @kernel_jit(launch_bounds=(GEMV_MAX_THREADS, min_blocks))
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
        warps = cuda.blockDim.x >> 5
        r0 = ((cuda.blockIdx.y * warps + (tid >> 5)) * groups + lane // segw) * r_out
        cols = n_chunks * 32
        # rows past the end read the last row (valid memory) and write nothing
        row0 = e * rows + min(r0, rows - 1)
        row1 = row0 if gate_up_mode else e * rows + min(r0 + 1, rows - 1)
        ab = cuda.local.array(16, float32)
        acc = cuda.local.array(n_acc, float32)
        xb = cuda.local.array(tb_n, int64)
        zs = cuda.gridDim.z
        for tok0 in range(start + cuda.blockIdx.z * tb_n, end, tb_n * zs):
            nt = min(tb_n, end - tok0)
            for tb in range(tb_n):
                acc[tb] = float32(0)
                acc[tb_n + tb] = float32(0)
                slot = min(tok0 + tb, end - 1)
                xb[tb] = (packed[slot] if gate_up_mode else slot) * cols
            c = lis
            while c < n_chunks:
                raw0 = fetch(wa, wb, wc, wd, row0, c, nb)
                if gate_up_mode:
                    raw1 = fetch(va, vb, vc, vd, row1, c, nb)
                else:
                    raw1 = fetch(wa, wb, wc, wd, row1, c, nb)
                affine(raw0, c, ab, 0)
                affine(raw1, c, ab, 8)
                # dequantize 4 values of each row right before their FMAs:
                # few registers live, so many warps per multiprocessor
                for s in range(nseg):
                    a0 = ab[s]
                    b0 = ab[4 + s]
                    a1 = ab[8 + s]
                    b1 = ab[12 + s]
                    col = seg_col(c, s)
                    for v in range(seglen // 4):
                        p0, p1, p2, p3 = values4(raw0, c, v, s)
                        g0 = a0 * p0 - b0
                        g1 = a0 * p1 - b0
                        g2 = a0 * p2 - b0
                        g3 = a0 * p3 - b0
                        p0, p1, p2, p3 = values4(raw1, c, v, s)
                        u0 = a1 * p0 - b1
                        u1 = a1 * p1 - b1
                        u2 = a1 * p2 - b1
                        u3 = a1 * p3 - b1
                        for tb in range(tb_n):
                            if tb < nt:
                                x0, x1, x2, x3 = load4(x, xb[tb] + col + 4 * v)
                                acc[tb] += g0 * x0 + g1 * x1 + g2 * x2 + g3 * x3
                                acc[tb_n + tb] += u0 * x0 + u1 * x1 + u2 * x2 + u3 * x3
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


def gemv_layout(rows: int, n_chunks: int, gate_up: bool, expert_slots: int, max_warps: int):
    """``(segw, warps, row_blocks)`` of the GEMV launch for weights with
    ``rows`` rows of ``n_chunks`` chunks.

    ``segw`` (lanes per row) is the largest power of two <= 32 that still
    gives every lane ``CUDA_LAUNCH.gemv_chunks_per_lane`` chunks when the
    row has that many.  Blocks shrink from ``max_warps`` warps until the grid
    has about two blocks per multiprocessor of an H100 (the router: one
    expert, few rows).
    """
    from ..config import CUDA_LAUNCH

    per_lane = CUDA_LAUNCH.gemv_chunks_per_lane
    segw = 1
    while segw < 32 and 2 * segw * per_lane <= n_chunks:
        segw <<= 1
    rows_per_warp = (32 // segw) * (1 if gate_up else 2)
    warps_needed = expert_slots * -(-rows // rows_per_warp)
    warps = max(1, min(max_warps, GEMV_MAX_THREADS // 32, warps_needed // _TARGET_BLOCKS))
    return segw, warps, -(-rows // (rows_per_warp * warps))


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

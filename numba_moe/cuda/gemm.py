"""Grouped expert GEMMs over quantized blocks: a GEMV kernel and a tiled one.

Both compute, for every active expert e and every slot s of e,

* ``gate_up`` mode: ``out[s, r] = silu(G_e[r] . x[tok(s)]) * (U_e[r] . x[tok(s)])``
  (gate, up and the activation fused; ``tok(s) = packed_token_idx[s]``, so the
  token rows are gathered by indirection, never copied);
* ``plain`` mode: ``out[s, r] = W_e[r] . x[s]`` (``x`` already per slot).

The weights are decoded chunk by chunk in registers (:mod:`.decoders`);
nothing is dequantized to memory.

*GEMV kernel* (few tokens per expert): grid ``(expert slot, row block,
token split)``; a block serves one expert.  It stages the activations of a
pass of ``nt`` tokens (a compile-time constant, 1 to
:data:`MAX_TOKENS_PER_PASS`) in shared memory; a group of ``segw`` lanes
owns a weight row (two rows per group: gate and up, or two consecutive
rows); lane ``i`` of a group walks chunks ``i, i + segw, ...`` and uses
each decoded chunk for all ``nt`` tokens, so each expert's rows are read
from memory once per pass.

*Tiled kernel* (many tokens per expert): one block computes a
``tile_m x tile_n`` output tile of one expert from vLLM-style padded blocks
(:func:`numba_moe.cuda.plan.plan_device`); each 32-value chunk of the
weight tile is decoded into shared memory (float32) once and reused by
``tile_m`` token rows; each thread accumulates a ``MICRO_M x MICRO_N``
micro-tile (per half in ``gate_up`` mode) in registers, fed by 16-byte
shared loads.  Plain FMA (SIMT) arithmetic in float32.
"""
from __future__ import annotations

from numba import cuda, float32, int32, int64

from .decoders import QInfo
from .primitives import load4, seg_sum, shared_load4, silu
from .primitives import kernel as kernel_jit

__all__ = ["MAX_TOKENS_PER_PASS", "tokens_per_pass", "gemv_kernel", "gemv_layout", "gemv_head",
           "gemv_store",
           "tiled_kernel", "tiled_layout", "MICRO_M", "MICRO_N"]

#: Most tokens the GEMV kernel serves per pass over an expert's weights.
MAX_TOKENS_PER_PASS = 8
#: Largest GEMV block (its register budget is ``CUDA_LAUNCH.gemv_min_blocks``).
GEMV_MAX_THREADS = 256
# Blocks the GEMV grid aims for: two per multiprocessor of an H100.
_TARGET_BLOCKS = 264
#: Tokens and weight rows of the per-thread output micro-tile of the tiled
#: kernel (multiples of 4: read with 16-byte shared loads).
MICRO_M = 8
MICRO_N = 4

_cache = {}


def tokens_per_pass(mean_tokens: float) -> int:
    """Tokens per GEMV pass for experts holding ``mean_tokens`` tokens on
    average: the smallest power of two >= it, at most :data:`MAX_TOKENS_PER_PASS`."""
    nt = 1
    while nt < MAX_TOKENS_PER_PASS and nt < mean_tokens:
        nt <<= 1
    return nt


def gemv_kernel(qi: QInfo, gate_up: bool, nt: int, by_pair: bool = False):
    """The GEMV kernel for weights of type ``qi`` serving ``nt`` tokens a pass.

    Signature::

        kernel[(n_expert_slots, row_blocks, token_splits), 32 * warps, stream,
               shared_bytes](
            wa, wb, wc, wd, va, vb, vc, vd, nb, n_chunks, rows, segw, lsegw, tile_chunks,
            x, num_slots, active, meta, offsets, packed_token_idx, out)

    Block ``(j, y, z)`` serves expert ``active[j]``, row block ``y``, and the
    passes of ``nt`` slots numbered ``z``, ``z + splits``, ...  ``w*`` gate
    (or plain) planes, ``v*`` up planes (ignored in plain mode); ``segw``
    lanes per row (``2**lsegw`` <= 32); ``tile_chunks`` chunks of the
    activations staged in shared memory at a time (``shared_bytes`` from
    :func:`gemv_layout`); ``x`` float32 flat ``[*, n_chunks * 32]``;
    ``active[j]`` the j-th expert with pairs and ``meta[0]`` their count;
    ``offsets`` [E+1] slot ranges (clamped to ``num_slots``); ``out``
    float32 flat ``[slots, rows]``; at most :data:`GEMV_MAX_THREADS`
    threads a block.  ``by_pair`` (``nt`` = 1): slots are pairs, block ``j``
    serves slot ``j`` alone with expert ``active[j]`` (``active`` the
    routing's ids; ``meta``, ``offsets`` unused), see :func:`gemv_head`.
    """
    from ..config import CUDA_LAUNCH

    key = ("gemv", qi.qtype, gate_up, nt, CUDA_LAUNCH.gemv_min_blocks, by_pair)
    if key not in _cache:
        _cache[key] = _make_gemv(qi, gate_up, nt, CUDA_LAUNCH.gemv_min_blocks, by_pair)
    return _cache[key]


def _gemv_source(nseg: int, seglen: int, gate_up: bool, nt: int, has_offset: bool,
                 by_pair: bool) -> str:
    """Python source of the GEMV kernel, its loops over segments, 4-value
    groups and tokens written out.

    Written out rather than left to LLVM's unroller, which gives up on
    bodies this large: a rolled loop turns every word choice of the decoders
    into a run-time select and every token into a predicate.  Lane ``lis``
    of a row group walks chunks ``c0 + lis``, ``c0 + lis + segw``, ...; the
    activations of a tile of chunks are staged in shared memory as
    ``[token][iteration][vector j][lane]`` float4s, so the lanes of a group
    read consecutive 16-byte words (no bank conflicts).  Per segment the
    kernel sums ``q * x`` (and ``x`` when the type has offsets) and applies
    ``a_s``, ``b_s`` once: ``sum (a q - b) x = a sum q x - b sum x``.
    """
    vps = seglen // 4
    toks = range(nt)
    lines = []
    emit = lines.append
    second = "va, vb, vc, vd" if gate_up else "wa, wb, wc, wd"
    emit("""
def kernel(wa, wb, wc, wd, va, vb, vc, vd, nb, n_chunks, rows, segw, lsegw, tile_chunks,
           x, num_slots, active, meta, offsets, packed, out):""")
    emit(gemv_head(gate_up, by_pair))
    emit(f"""    cols = n_chunks * 32
    xs = cuda.shared.array(0, float32)
    xrow = cuda.shared.array({nt}, int64)
    ab = cuda.local.array(16, float32)
    n_it_max = (tile_chunks + segw - 1) // segw
    tstride = int32(n_it_max * 8 * segw)
    vstride = int32(4 * segw)
    for pa in range(start + cuda.blockIdx.z * {nt}, end, {nt} * cuda.gridDim.z):
        cuda.syncthreads()
        if tid < {nt}:
            slot = min(pa + tid, end - 1)
            xrow[tid] = int64({"packed[slot]" if gate_up else "slot"}) * cols""")
    for t in toks:
        emit(f"        g{t} = float32(0)\n        u{t} = float32(0)")
    emit(f"""        for c0 in range(0, n_chunks, tile_chunks):
            tc = min(tile_chunks, n_chunks - c0)
            cuda.syncthreads()
            n_slot = ((tc + segw - 1) >> lsegw) << (lsegw + 3)
            for idx in range(tid, {nt} * n_slot, nthreads):
                t = int32(idx) // int32(n_slot)
                k = int32(idx) - t * int32(n_slot)
                c = ((k >> (lsegw + 3)) << lsegw) + (k & (segw - 1))
                if c < tc:
                    jv = (k >> lsegw) & 7
                    s = jv // {vps}
                    col = seg_col(c0 + c, s) + 4 * (jv - s * {vps})
                    x0, x1, x2, x3 = load4(x, xrow[t] + col)
                    o = 4 * (t * tstride + k)
                    xs[o] = x0
                    xs[o + 1] = x1
                    xs[o + 2] = x2
                    xs[o + 3] = x3
            cuda.syncthreads()
            c = c0 + lis
            xb = int32(4 * lis)
            while c < c0 + tc:
                raw0 = fetch(wa, wb, wc, wd, row0, c, nb)
                raw1 = fetch({second}, row1, c, nb)
                affine(raw0, c, ab, 0)
                affine(raw1, c, ab, 8)""")
    ind = " " * 16
    for sg in range(nseg):
        for t in toks:
            emit(f"{ind}sg{t} = float32(0)\n{ind}su{t} = float32(0)")
            if has_offset:
                emit(f"{ind}sx{t} = float32(0)")
        for v in range(vps):
            jv = sg * vps + v
            emit(f"{ind}q0, q1, q2, q3 = values4(raw0, c, {v}, {sg})")
            emit(f"{ind}h0, h1, h2, h3 = values4(raw1, c, {v}, {sg})")
            for t in toks:
                emit(f"{ind}x0, x1, x2, x3 = shared_load4(xs, 4 * ({t} * tstride) + xb"
                     f" + {jv} * vstride)")
                for i in range(4):
                    emit(f"{ind}sg{t} += q{i} * x{i}\n{ind}su{t} += h{i} * x{i}")
                if has_offset:
                    emit(f"{ind}sx{t} += (x0 + x1) + (x2 + x3)")
        for t in toks:
            if has_offset:
                emit(f"{ind}g{t} += ab[{sg}] * sg{t} - ab[{4 + sg}] * sx{t}")
                emit(f"{ind}u{t} += ab[{8 + sg}] * su{t} - ab[{12 + sg}] * sx{t}")
            else:
                emit(f"{ind}g{t} += ab[{sg}] * sg{t}\n{ind}u{t} += ab[{8 + sg}] * su{t}")
    emit(f"{ind}c += segw\n{ind}xb += 8 * vstride")
    emit(gemv_store(nt, gate_up))
    return "\n".join(lines) + "\n"


def gemv_head(gate_up: bool, by_pair: bool = False) -> str:
    """Opening lines of a GEMV kernel body (this one and :mod:`.qgemv`'s):
    the block's expert ``e`` and slot range ``start:end`` (exit when the
    block has no expert), lane ``lis`` of its row group, the group's output
    row ``r0`` and the global weight rows ``row0``, ``row1`` it reads.

    ``by_pair``: block ``j`` serves slot ``j`` (pair ``j`` of the routing)
    with expert ``active[j]``: the routing's ids stand for a plan when
    experts hold about one token each, and the plan kernel is skipped."""
    if by_pair:
        head = """    j = cuda.blockIdx.x
    if j >= num_slots:
        return
    e = active[j]
    start = j
    end = j + 1"""
    else:
        head = """    j = cuda.blockIdx.x
    if j >= meta[0]:
        return
    e = active[j]
    start = offsets[e]
    end = min(offsets[e + 1], num_slots)"""
    return head + f"""
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    lane = tid & 31
    lis = lane & (segw - 1)
    r0 = ((cuda.blockIdx.y * (nthreads >> 5) + (tid >> 5)) * (32 // segw)
          + lane // segw) * {1 if gate_up else 2}
    # rows past the end read the last row (valid memory) and write nothing
    row0 = int64(e) * rows + min(r0, rows - 1)
    row1 = {"row0" if gate_up else "int64(e) * rows + min(r0 + 1, rows - 1)"}"""


def gemv_store(nt: int, gate_up: bool) -> str:
    """Closing lines of a GEMV pass: each token's ``g{t}``, ``u{t}`` summed
    over the row group and stored by its first lane (``silu(g) * u``, or
    the two rows)."""
    lines = []
    for t in range(nt):
        lines.append(f"""        g = seg_sum(g{t}, segw)
        u = seg_sum(u{t}, segw)
        slot = pa + {t}
        if slot < end and lis == 0 and r0 < rows:""")
        if gate_up:
            lines.append("            out[slot * rows + r0] = silu(g) * u")
        else:
            lines.append("""            out[slot * rows + r0] = g
            if r0 + 1 < rows:
                out[slot * rows + r0 + 1] = u""")
    return "\n".join(lines)


def _make_gemv(qi: QInfo, gate_up: bool, nt: int, min_blocks: int, by_pair: bool):
    src = _gemv_source(qi.nseg, qi.seglen, gate_up, nt, qi.has_offset, by_pair)
    ns = dict(cuda=cuda, float32=float32, int32=int32, int64=int64, fetch=qi.fetch,
              affine=qi.affine, values4=qi.values4, seg_col=qi.seg_col, load4=load4,
              shared_load4=shared_load4, seg_sum=seg_sum, silu=silu)
    exec(compile(src, f"<gemv {qi.qtype.name} gate_up={gate_up} nt={nt} by_pair={by_pair}>",
                 "exec"), ns)
    return kernel_jit(launch_bounds=(GEMV_MAX_THREADS, min_blocks))(ns["kernel"])


def gemv_layout(rows: int, n_chunks: int, gate_up: bool, expert_slots: int, max_warps: int,
                nt: int, shared_budget: int, token_splits: int = 1, pairs: bool = False):
    """``(segw, warps, row_blocks, tile_chunks, shared_bytes)`` of the GEMV
    launch for weights with ``rows`` rows of ``n_chunks`` chunks, ``nt``
    tokens a pass.

    ``segw`` (lanes per row) is the largest power of two <= 32 that still
    gives every lane ``2 * CUDA_LAUNCH.gemv_chunks_per_lane`` chunks (four
    times that with ``nt >= 4``) when the row has that many; with ``pairs``
    lanes walk units of two chunks (:func:`numba_moe.cuda.qgemv.uses_pairs`),
    as many chunks a lane.  Blocks shrink from ``max_warps`` warps until the
    grid has about two blocks per multiprocessor of an H100; a single expert (the
    router, a shared expert) gets the largest blocks, as each block stages
    the same activations.  The staged activations (``nt`` tokens of
    ``tile_chunks`` chunks) fit ``shared_budget`` bytes.
    """
    from ..config import CUDA_LAUNCH

    per_lane = CUDA_LAUNCH.gemv_chunks_per_lane
    # lanes walk units of one chunk, or of two (``pairs``: the same chunks a lane)
    units = n_chunks // 2 if pairs else n_chunks
    if pairs:
        per_lane = max(1, per_lane // 2)
    if nt >= 4:
        # passes of 4+ tokens give a lane enough work per chunk; fewer lanes a
        # row reload the activations fewer times (H100, T=64: 726 -> 639 us)
        per_lane *= 4
    segw = 1
    while segw < 32 and 2 * segw * per_lane <= units:
        segw <<= 1
    rows_per_group = 1 if gate_up else 2
    # few rows (the router): more lanes per row, for more warps in flight
    while segw < 32 and expert_slots * -(-rows * segw // (32 * rows_per_group)) \
            < CUDA_LAUNCH.gemv_min_warps:
        segw <<= 1
    rows_per_warp = (32 // segw) * rows_per_group
    warps_needed = expert_slots * -(-rows // rows_per_warp)
    warps = max(1, min(max_warps, GEMV_MAX_THREADS // 32,
                       warps_needed * token_splits // _TARGET_BLOCKS))
    if expert_slots == 1:
        warps = max(1, min(CUDA_LAUNCH.gemv_single_warps, GEMV_MAX_THREADS // 32, warps_needed))
    tile = max(segw, shared_budget // (nt * 128) // segw * segw)
    tile = min(tile, -(-n_chunks // segw) * segw)
    return segw, warps, -(-rows // (rows_per_warp * warps)), tile, nt * tile * 128


def tiled_kernel(qi: QInfo, gate_up: bool, tile_m: int, tile_n: int):
    """The tiled kernel for weights of type ``qi``.

    Signature::

        kernel[(m_blocks, n_blocks, k_splits), threads, stream, shared_bytes](
            wa, wb, wc, wd, va, vb, vc, vd, nb, n_chunks, rows,
            x, num_pairs, top_k, sorted_ids, block_expert, meta,
            pairs_by_token, out, part_stride)

    (``threads``, ``n_blocks``, ``shared_bytes`` from :func:`tiled_layout`;
    ``tile_m`` a multiple of :data:`MICRO_M`, ``tile_n`` of :data:`MICRO_N`.)
    Block ``mb`` computes rows ``sorted_ids[mb*tile_m : (mb+1)*tile_m]`` (pair
    indices; ``>= num_pairs`` is padding) of expert ``block_expert[mb]``, and
    exits when ``mb * tile_m >= meta[1]``.  Input row of pair ``p``: token
    ``p // top_k`` (gate_up) or slot ``pairs_by_token[p]`` (plain); output
    row: that slot.  Plain mode may split the columns: block ``z`` of
    ``k_splits`` sums chunks ``z * n_chunks // k_splits ..`` and writes
    ``out[z * part_stride + ...]``; the caller adds the planes.
    """
    key = ("tiled", qi.qtype, gate_up, tile_m, tile_n)
    if key not in _cache:
        _cache[key] = _make_tiled(qi, gate_up, tile_m, tile_n)
    return _cache[key]


def _tiled_source(bm: int, bn: int, gate_up: bool) -> str:
    """Python source of the tiled kernel, its micro-tile written out.

    Thread ``(ty, tx)`` owns tokens ``ty*MICRO_M ...`` and rows
    ``tx*MICRO_N ...`` of the block tile (of gate and up in ``gate_up``
    mode), accumulated in named registers.  Per 32-value chunk the block
    stages the activations as ``a_s[k][m]`` (row stride ``bm + 4``) and the
    decoded float32 weights as ``w_s[k][n]`` (gate rows, then up rows), so
    that a thread reads its ``MICRO_M`` activations and ``MICRO_N`` weights
    (per half) of one ``k`` with 16-byte shared loads: 4 loads (gate_up) per
    64 FMAs.  The loops over the micro-tile are written out because LLVM
    does not fully unroll a body this large (the accumulators would live in
    local memory).
    """
    rw = 2 if gate_up else 1
    a_stride = bm + 4
    wn = rw * bn
    toks = range(MICRO_M)
    cols_ = range(MICRO_N)
    halves = range(rw)
    lines = []
    emit = lines.append
    emit(f"""
def kernel(wa, wb, wc, wd, va, vb, vc, vd, nb, n_chunks, rows,
           x, num_pairs, top_k, sorted_ids, block_expert, meta, pairs_by_token, out,
           part_stride):
    mb = cuda.blockIdx.x
    if mb * {bm} >= meta[1]:
        return
    e = block_expert[mb]
    n0 = cuda.blockIdx.y * {bn}
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    ty = tid // {bn // MICRO_N}
    tx = tid - ty * {bn // MICRO_N}
    sh = cuda.shared.array(0, float32)
    xrow_s = cuda.shared.array({bm}, int64)
    orow_s = cuda.shared.array({bm}, int64)
    for m in range(tid, {bm}, nthreads):
        p = sorted_ids[mb * {bm} + m]
        if p < num_pairs:
            slot = pairs_by_token[p]
            xrow_s[m] = {"p // top_k" if gate_up else "slot"}
            orow_s[m] = slot
        else:
            xrow_s[m] = -1
            orow_s[m] = -1
    cuda.syncthreads()
    cols = n_chunks * 32
    erow = int64(e) * rows
    q = cuda.local.array(32, float32)
    ab = cuda.local.array(8, float32)
    a_off = int32(ty * {MICRO_M})
    w_off = int32({32 * a_stride} + tx * {MICRO_N})""")
    for h in halves:
        for i in toks:
            emit("    " + " = ".join(f"c{h}_{i}_{j}" for j in cols_) + " = float32(0)")
    emit(f"""    kz = cuda.blockIdx.z
    nz = cuda.gridDim.z
    for c in range(kz * n_chunks // nz, (kz + 1) * n_chunks // nz):
        # activations: consecutive threads take consecutive tokens (no bank conflicts)
        for idx in range(tid, {bm * 8}, nthreads):
            kg = idx // {bm}
            m = idx - kg * {bm}
            k = kg * 4
            xr = xrow_s[m]
            if xr >= 0:
                s = k // seglen
                x0, x1, x2, x3 = load4(x, xr * cols + seg_col(c, s) + k - s * seglen)
            else:
                x0 = x1 = x2 = x3 = float32(0)
            o = k * {a_stride} + m
            sh[o] = x0
            sh[o + {a_stride}] = x1
            sh[o + {2 * a_stride}] = x2
            sh[o + {3 * a_stride}] = x3
        for wr in range(tid, {wn}, nthreads):
            half = wr // {bn}
            r = n0 + wr - half * {bn}
            if r < rows:
                if half == 1:
                    decode(va, vb, vc, vd, erow + r, c, nb, q, 0, ab, 0)
                else:
                    decode(wa, wb, wc, wd, erow + r, c, nb, q, 0, ab, 0)
                for s in range(nseg):
                    a = ab[s]
                    b = ab[4 + s]
                    for i in range(seglen):
                        sh[{32 * a_stride} + (s * seglen + i) * {wn} + wr] = a * q[s * seglen + i] - b
            else:
                for i in range(32):
                    sh[{32 * a_stride} + i * {wn} + wr] = float32(0)
        cuda.syncthreads()
        ao = a_off
        wo = w_off
        for k in range(32):""")
    ind = " " * 12
    for g in range(MICRO_M // 4):
        emit(f"{ind}" + ", ".join(f"x{4 * g + i}" for i in range(4))
             + f" = shared_load4(sh, ao + {4 * g})")
    for h in halves:
        for g in range(MICRO_N // 4):
            emit(f"{ind}" + ", ".join(f"w{h}_{4 * g + j}" for j in range(4))
                 + f" = shared_load4(sh, wo + {h * bn + 4 * g})")
    for h in halves:
        for i in toks:
            for j in cols_:
                emit(f"{ind}c{h}_{i}_{j} += x{i} * w{h}_{j}")
    emit(f"""{ind}ao += {a_stride}
{ind}wo += {wn}
        cuda.syncthreads()""")
    emit("    part = int64(kz) * part_stride")
    for i in toks:
        emit(f"""    orow = orow_s[ty * {MICRO_M} + {i}]
    if orow >= 0:""")
        for j in cols_:
            val = f"silu(c0_{i}_{j}) * c1_{i}_{j}" if gate_up else f"c0_{i}_{j}"
            emit(f"""        n = n0 + tx * {MICRO_N} + {j}
        if n < rows:
            out[part + orow * rows + n] = {val}""")
    return "\n".join(lines) + "\n"


def _make_tiled(qi: QInfo, gate_up: bool, bm: int, bn: int):
    src = _tiled_source(bm, bn, gate_up)
    ns = dict(cuda=cuda, float32=float32, int32=int32, int64=int64, decode=qi.decode,
              seg_col=qi.seg_col, nseg=qi.nseg, seglen=qi.seglen, load4=load4,
              shared_load4=shared_load4, silu=silu)
    exec(compile(src, f"<tiled {qi.qtype.name} gate_up={gate_up} {bm}x{bn}>", "exec"), ns)
    return cuda.jit(ns["kernel"])


def tiled_layout(rows: int, tile_m: int, tile_n: int, gate_up: bool):
    """``(threads, n_blocks, shared_bytes)`` of the tiled launch for ``rows``
    output rows (``gate_up``: gate and up weight tiles staged)."""
    wn = (2 if gate_up else 1) * tile_n
    return ((tile_m // MICRO_M) * (tile_n // MICRO_N), -(-rows // tile_n),
            4 * 32 * (tile_m + 4 + wn))

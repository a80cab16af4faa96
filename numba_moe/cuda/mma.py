"""Tiled grouped GEMM on tensor cores: integer ``mma.sync`` over weight codes and activation codes.

For many tokens per expert the GEMM is bound by arithmetic, and the SIMT
tiled kernel of :mod:`.gemm` (float32 FMAs after a float decode) reaches
about 20 TFLOP/s.  Here the weights stay integer codes (the decoders'
``kstep32``) and the activations are the 16-bit codes of :mod:`.actquant`
(two signed byte planes), so the products run on the tensor cores, one
*step* of 32 columns at a time (``mma.m16n8k32``,
:func:`~.primitives.mma_s8_k32`).  This kernel serves Q5_K and Q8_0; Q4_K
and Q6_K take the fp16 kernel of :mod:`.hmma`, which needs no per-step
epilogue.  Within a step every weight row has one scale and
offset ``(a, b)`` and every token one code scale ``d`` (with its sums ``s``
and rounding ``r``), so per output element and step::

    acc = mma(A, B_hi) << 8;  acc = mma(A, B_lo, acc)     exact int32
    out += a * (d * acc + c * r) - b * s                   float32

(``c``: the type's ``codes_center``, as in :mod:`.qgemv`).

Block ``(mb, nb)``: tokens ``sorted_ids[mb * tile_m : (mb + 1) * tile_m]``
of expert ``block_expert[mb]`` (the plan's padded layout, sentinel =
padding) times 64 weight rows (and the 64 matching up rows in ``gate_up``
mode), 4 warps of 16 rows; a warp holds all ``tile_m`` tokens as
``tile_m / 8`` mma tiles.  Lane ``(g, i)`` (``g = lane >> 2``, ``i = lane
& 3``) loads the A codes of rows ``g`` and ``g + 8`` straight from the
blocks (a quad reads 16 contiguous bytes of a row; the next step's while
this one computes).  The block's activation codes and scale terms are
staged in shared memory :data:`STAGE` steps at a time (read from global
memory once per block instead of once per warp and lane group: scattered
per-lane loads of them made the kernel L1-bound).
"""
from __future__ import annotations

from numba import cuda, float32, int32, int64, uint32

from .decoders import QInfo
from .primitives import kernel as kernel_jit
from .primitives import load4, mma_s8_k32, shared_load4, silu

__all__ = ["WARPS", "mma_kernel", "mma_layout", "tile_head"]

#: Warps a block (16 weight rows each) of this kernel, and the default of
#: the fp16 one (:func:`numba_moe.cuda.hmma.block_warps`).
WARPS = 4

#: Steps (16 columns each) of activation codes a block stages in shared memory at a time.
STAGE = 8
# Shared row strides (words) of a token's staged codes and scale terms, padded
# so that the 8 tokens a warp reads at once fall on different banks.
XS = 8 * STAGE + 4
AS = 4 * STAGE + 4

_cache = {}


def mma_kernel(qi: QInfo, gate_up: bool, tile_m: int):
    """The tensor-core kernel for quantized weights of type ``qi`` (``qi.kstep32`` set).

    Signature::

        kernel[m_blocks * n_blocks, 32 * WARPS, stream](
            wa, wb, wc, wd, va, vb, vc, vd, nb, n_steps, rows, xq, xa, groups,
            num_pairs, top_k, sorted_ids, block_expert, meta, pairs_by_token, out, row_fast)

    ``n_steps`` = columns / 16; ``xq``, ``xa``: codes of the input rows
    (:mod:`.actquant`), ``groups`` 16-column groups a row (= ``n_steps``);
    input row of pair ``p``: token ``p // top_k`` (gate_up) or slot
    ``pairs_by_token[p]`` (plain); output row: that slot.  ``tile_m`` (a
    multiple of 8) is the plan's block size.
    """
    from ..config import CUDA_LAUNCH

    key = (qi.qtype, gate_up, tile_m, CUDA_LAUNCH.mma_min_blocks)
    if key not in _cache:
        _cache[key] = _make(qi, gate_up, tile_m, CUDA_LAUNCH.mma_min_blocks)
    return _cache[key]


def mma_layout(rows: int, warps: int = WARPS, row_tiles: int = 1):
    """``(threads, n_blocks)`` of the launch for ``rows`` output rows, blocks
    of ``warps`` warps (``16 * row_tiles`` rows each)."""
    return 32 * warps, -(-rows // (16 * row_tiles * warps))


def row_blocks_fast(act_bytes: int) -> bool:
    """Whether a tiled tensor-core launch walks row blocks fastest.

    The blocks running at one time then share a token block's activations
    (and their expert's weights) in L2; with token blocks fastest they share
    a row block of every expert's weights, and every row block streams all
    activations again, from DRAM once they outgrow L2.  H100, whole forward
    (token blocks / row blocks fastest): T=4096 3797 / 3583 us (down
    projection: 100 MB of activations, 1745 / 1464 us); T=512 713 / 708
    (down 388 / 431, gate / up 471 / 454); T=64 342 / 343.  So row blocks
    go fastest above ``CUDA_LAUNCH.row_fast_bytes`` of activations read.
    """
    from ..config import CUDA_LAUNCH

    return act_bytes > CUDA_LAUNCH.row_fast_bytes


def tile_head(tile_m: int, gate_up: bool, scales: bool, part_shift: int = 0,
              warps: int = WARPS, row_tiles: int = 1) -> str:
    """Opening lines of a tensor-core kernel body (this one's and :mod:`.hmma`'s).

    The block's expert ``e`` (the block exits past the padded run; with
    ``part_shift`` > 0 token block ``mb`` is part ``mb % 2**part_shift`` of
    the plan's block ``mb >> part_shift``, and exits when it holds only
    padding, which ends each expert's run), lane
    ``(g, i)``, each of its ``tile_m`` tokens' input row ``xrow_s`` and output
    row ``orow_s`` (-1: padding) in shared memory (with ``scales`` also the
    input row's ``xsc`` entry, ``xsc_s``), and the warp's weight rows ``r0``,
    ``r1``, ... (global ``row0``, ``row1``, ...: rows ``g``, ``g + 8``, ``g +
    16``, ... of the warp's), blocks of ``warps`` warps of ``16 * row_tiles``
    rows.

    The grid is one-dimensional, ``m_blocks * n_blocks`` blocks; with
    ``row_fast`` block ``b`` takes row block ``b % n_blocks`` of token block
    ``b // n_blocks`` (see :func:`row_blocks_fast`), else token block ``b %
    m_blocks`` of row block ``b // m_blocks``.
    """
    rows_w = 16 * row_tiles
    rows_b = rows_w * warps
    src = f"""    nrb = (rows + {rows_b - 1}) // {rows_b}
    nmb = cuda.gridDim.x // nrb
    if row_fast:
        mb = cuda.blockIdx.x // nrb
        rb = cuda.blockIdx.x - mb * nrb
    else:
        rb = cuda.blockIdx.x // nmb
        mb = cuda.blockIdx.x - rb * nmb
    if mb * {tile_m} >= meta[1]:
        return""" + (f"""
    if sorted_ids[mb * {tile_m}] >= num_pairs:
        return
    e = block_expert[mb >> {part_shift}]""" if part_shift else """
    e = block_expert[mb]""") + f"""
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    lane = tid & 31
    g = lane >> 2
    i = lane & 3
    xrow_s = cuda.shared.array({tile_m}, int32)
    orow_s = cuda.shared.array({tile_m}, int32)""" + (f"""
    xsc_s = cuda.shared.array({tile_m}, float32)""" if scales else "") + f"""
    for m in range(tid, {tile_m}, nthreads):
        p = sorted_ids[mb * {tile_m} + m]
        # padding reads row 0 (valid memory) and writes nothing
        xr = 0
        orow = -1
        if p < num_pairs:
            orow = pairs_by_token[p]
            xr = {"p // top_k" if gate_up else "orow"}
        xrow_s[m] = xr
        orow_s[m] = orow"""
    if scales:
        src += """
        xsc_s[m] = xsc[xr]"""
    src += f"""
    cuda.syncthreads()
    r0 = rb * {rows_b} + (tid >> 5) * {rows_w} + g
    # rows past the end read the last row (valid memory) and write nothing"""
    for r in range(1, 2 * row_tiles):
        src += f"\n    r{r} = r0 + {8 * r}"
    for r in range(2 * row_tiles):
        src += f"\n    row{r} = int64(e) * rows + min(r{r}, rows - 1)"
    return src


def _source(tile_m: int, gate_up: bool, center: int) -> str:
    """Python source of the kernel, its token tiles and accumulators written out
    (steps of 32 columns: ``kstep32``, ``mma.m16n8k32``; the activation scale
    is shared by the step's two 16-column groups)."""
    ntiles = tile_m // 8
    halves = range(2 if gate_up else 1)
    lines = []
    emit = lines.append
    emit("""
def kernel(wa, wb, wc, wd, va, vb, vc, vd, nb, n_steps, rows, xq, xa, groups,
           num_pairs, top_k, sorted_ids, block_expert, meta, pairs_by_token, out, row_fast):""")
    emit(tile_head(tile_m, gate_up, False))
    for h in halves:
        for n in range(ntiles):
            emit("    " + " = ".join(f"c{h}_{n}_{k}" for k in range(4)) + " = float32(0)")
    # the next step's weight codes load while this step computes
    fetch = [("00", "wa, wb, wc, wd", "row0"), ("01", "wa, wb, wc, wd", "row1")]
    if gate_up:
        fetch += [("10", "va, vb, vc, vd", "row0"), ("11", "va, vb, vc, vd", "row1")]
    # the weight codes of columns 16..31 of the step in v*
    dec = "nw{0}, nv{0}, na{0}, nb{0} = kstep32"
    cur = "w{0}, v{0}, a{0}, b{0} = nw{0}, nv{0}, na{0}, nb{0}"
    for name, planes, row in fetch:
        emit(f"    {dec.format(name)}({planes}, {row}, 0, nb, i)")
    emit(f"""    xs = cuda.shared.array({tile_m * XS}, uint32)
    as_ = cuda.shared.array({tile_m * AS}, float32)
    for ks0 in range(0, n_steps, {STAGE}):
        se = min({STAGE}, n_steps - ks0)
        cuda.syncthreads()
        for idx in range(tid, {tile_m * 2 * STAGE}, nthreads):
            m = idx // {2 * STAGE}
            u = idx - m * {2 * STAGE}
            if u < 2 * se:
                w0, w1, w2, w3 = load4(xq, (xrow_s[m] * groups + ks0) * 8 + 4 * u)
                o = m * {XS} + 4 * u
                xs[o] = w0
                xs[o + 1] = w1
                xs[o + 2] = w2
                xs[o + 3] = w3
        for idx in range(tid, {tile_m * STAGE}, nthreads):
            m = idx // {STAGE}
            u = idx - m * {STAGE}
            if u < se:
                f0, f1, f2, f3 = load4(xa, (xrow_s[m] * groups + ks0 + u) * 12)
                o = m * {AS} + 4 * u
                as_[o] = f0
                as_[o + 1] = f1
                as_[o + 2] = f2
                as_[o + 3] = f3
        cuda.syncthreads()
        for kss in range(0, se, 2):
            ks = ks0 + kss
            kn = min((ks >> 1) + 1, (n_steps >> 1) - 1)""")
    for name, planes, row in fetch:
        emit(f"            {cur.format(name)}")
        emit(f"            {dec.format(name)}({planes}, {row}, kn, nb, i)")
    ind = " " * 12
    # per step: base offsets of this lane's B codes and scale terms (tile n adds a constant)
    emit(f"{ind}xb = g * {XS} + kss * 8 + i")
    emit(f"{ind}ab = 2 * i * {AS} + kss * 4")
    for name, _, _ in fetch:
        emit(f"{ind}m{name} = -b{name}")
    for n in range(ntiles):
        tx, ta = 8 * n * XS, 8 * n * AS
        emit(f"{ind}hb = xs[xb + {tx}]")
        emit(f"{ind}lb = xs[xb + {tx + 4}]")
        for tok in (0, 1):
            emit(f"{ind}d{tok}, s{tok}, q{tok}, _ = shared_load4(as_, ab + {ta + tok * AS})")
        # the step's second group: its codes, and its sums added to the first's
        emit(f"{ind}hb2 = xs[xb + {tx + 8}]")
        emit(f"{ind}lb2 = xs[xb + {tx + 12}]")
        for tok in (0, 1):
            emit(f"{ind}_, s2, q2, _ = shared_load4(as_, ab + {ta + tok * AS + 4})")
            emit(f"{ind}s{tok} += s2")
            emit(f"{ind}q{tok} += q2")
        if center:
            emit(f"{ind}q0 *= float32({center})")
            emit(f"{ind}q1 *= float32({center})")
        for h in halves:
            emit(f"""{ind}t0, t1, t2, t3 = mma_s8_k32(w{h}0, w{h}1, v{h}0, v{h}1, hb, hb2, 0, 0, 0, 0)
{ind}t0, t1, t2, t3 = mma_s8_k32(w{h}0, w{h}1, v{h}0, v{h}1, lb, lb2,
{ind}                            t0 << 8, t1 << 8, t2 << 8, t3 << 8)""")
            for k, (tok, rowk) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
                # a (d t + c r) - b s as three fused multiply-adds
                f = f"cuda.fma(d{tok}, float32(t{k}), q{tok})" if center else f"d{tok} * float32(t{k})"
                acc = f"c{h}_{n}_{k}"
                emit(f"{ind}{acc} = cuda.fma(m{h}{rowk}, s{tok}, cuda.fma(a{h}{rowk}, {f}, {acc}))")
    for n in range(ntiles):
        for k, (tok, rowk) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
            val = f"silu(c0_{n}_{k}) * c1_{n}_{k}" if gate_up else f"c0_{n}_{k}"
            emit(f"""    orow = orow_s[{8 * n + tok} + 2 * i]
    if orow >= 0 and r{rowk} < rows:
        out[int64(orow) * rows + r{rowk}] = {val}""")
    return "\n".join(lines) + "\n"


def _make(qi: QInfo, gate_up: bool, tile_m: int, min_blocks: int):
    src = _source(tile_m, gate_up, qi.codes_center)
    ns = dict(cuda=cuda, float32=float32, int32=int32, int64=int64, uint32=uint32,
              kstep32=qi.kstep32, load4=load4, shared_load4=shared_load4,
              mma_s8_k32=mma_s8_k32, silu=silu)
    exec(compile(src, f"<mma {qi.qtype.name} gate_up={gate_up} tile_m={tile_m}>", "exec"), ns)
    return kernel_jit(launch_bounds=(32 * WARPS, min_blocks))(ns["kernel"])

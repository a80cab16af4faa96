"""Tiled grouped GEMM on fp16 tensor cores for Q4_K and Q6_K weights.

The integer kernel of :mod:`.mma` pays a float epilogue per output element
every 32 columns, because weight scales and activation scales both change
there; that epilogue, not the tensor cores, bounds it.  Here the weights'
sub-block scales go *into* the operands: an fp16 holds every integer up to
2048 exactly, so

* Q4_K: ``A = sc * q`` (``sc`` 6-bit, ``q`` 4-bit: at most 945);
* Q6_K: ``sc * (q - 32)`` reaches 4096, so it is split exactly into
  ``A1 = (sc & ~1) * (q - 32)`` (even, at most 4096) and
  ``A2 = (sc & 1) * (q - 32)``,

and the activations come as two fp16 terms per value (:mod:`.actsplit`).
``A2`` multiplies only the hi terms: the lo ones are within 2^-12 of a
value, and ``A2`` is at most 1 / |sc| of the sub-block's ``A``, so the
product left out is about 2e-6 of a row's sum (the issue's bound is 1e-4)
and a step takes three ``mma`` a token tile instead of four.
The ``mma.m16n8k16`` products accumulate in float32 over a whole
256-column block; the block's ``d`` (and, for Q4_K, ``dmin`` times the
sub-block minimums against the activations' 32-column sums, one
``mma.m16n8k8``) apply once per block, in one of two ways
(:func:`rescaled`).  With running sums::

    acc  = sum over the block's steps of  A @ (B_hi + B_lo)      fp32, tensor cores
    out += d * acc - 32 * dmin * (M @ S')                         per 256 columns
    out *= s                                                      the row scale, at the end

or, with half the accumulator registers, ``acc`` alone holds a row's sum in
units of ``D``, the last nonzero ``d`` of the row so far (a block with ``d =
0`` adds no products and keeps ``D``)::

    acc *= D / d;  D = d                                          at a block's start
    acc += A @ (B_hi + B_lo)                                      each step
    acc -= (32 * dmin / D) * (M @ S')                             at its end
    out  = s * D * acc

(one rounding more a block).

Token block ``mb``, row block ``rb`` (:func:`~.mma.tile_head`): tokens
``sorted_ids[mb * tile_m : (mb + 1) * tile_m]`` of expert
``block_expert[mb]`` times 64 weight rows (and the 64 matching up
rows in ``gate_up`` mode), 4 warps of 16 rows (down projections with
32-token tiles: 128 rows, 8 warps, :func:`block_warps`; with 8- or 16-token
tiles: 128 rows, 4 warps of two 16-row tiles, :func:`row_tiles`); a warp
holds all ``tile_m`` tokens as ``tile_m / 8`` mma tiles.  Lane ``(g, i)``
reads the weight word of columns ``4i .. 4i + 3`` of its rows ``g`` and ``g
+ 8`` (and ``g + 16``, ``g + 24``) per step and
unpacks it into two fp16 pairs with the exponent trick ``half(0x6400 | n) =
1024 + n`` and one ``fma.f16x2`` that subtracts the 1024 and multiplies by
the scale (exact: one rounding of an exact integer).  The block's
activation words are staged in shared memory :func:`stage_steps` steps at a
time, in two buffers (``cp.async`` copies the next stage while this one
computes), read with one 16-byte load per tile and step; a lane loads each
of its weight words once, a group of steps ahead (:data:`STREAMS`), and the
block headers one block ahead.

Measured (H100, Qwen3-30B-A3B layer, whole forward): T=512 1837 -> 1283 us,
T=4096 8531 -> 6376 us against the integer kernel; with the rescaled gate /
up and fewer instructions a step (session 6: each weight word loaded once,
index arithmetic hoisted out of the staging and the loads) T=512 772 us,
T=4096 4063; session 7 (sub-block scales unpacked once a stage, one
``prmt`` a scale; Q6_K's ``A2`` against hi terms only) T=64 385 -> 351,
T=512 795 -> 748, T=4096 4035 -> 3794; session 8 (weight words through
``load1``, without the wraparound of plain indexing) T=64 350 -> 338,
T=512 722 -> 692, T=4096 3617 -> 3449; session 9 (the down projection
takes 64-token plan blocks in 32-token parts, ``part_shift``) T=4096 down
phase 1589 -> 1444.  Outputs within about 2e-7 of
float64 (Q4_K), 2e-6 (Q6_K).
"""
from __future__ import annotations

import gguf
import numpy as np
from numba import cuda, float32, int32, int64, uint32

from .decoders import _B1, _B2, _B4, _pick4, kq_scale_min, kq_scale_words
from .mma import WARPS, mma_layout, tile_head
from .primitives import cp_async16, cp_async_commit, cp_async_wait1, device_inline, half2_f32
from .primitives import hfma2, load1, load4, mma_f16, mma_f16_k8, pack_half2, prmt
from .primitives import shared_load4, silu
from .primitives import kernel as kernel_jit

__all__ = ["TYPES", "STREAMS", "stage_steps", "block_warps", "min_blocks", "rescaled",
           "hmma_kernel", "hmma_layout"]

Q = gguf.GGMLQuantizationType
#: Weight types this kernel reads.
TYPES = (Q.Q4_K, Q.Q6_K)
#: A lane's weight words per type, as streams ``(name, loader, plane, period,
#: fresh, words, first)``: the steps of an aligned group of ``period`` use
#: ``fresh`` distinct words (step ``ks`` the word of step ``ks % fresh`` of
#: its group), so each word loads once, a group ahead of its first use; a
#: block holds ``words`` words of the plane, its step-0 word of lane ``i``
#: at ``first + i``.
STREAMS = {Q.Q4_K: (("w", "_q4k_word", 0, 4, 2, 36, 4),),
           Q.Q6_K: (("l", "_q6k_ql", 0, 8, 4, 32, 0), ("q", "_q6k_qh", 1, 8, 2, 16, 0))}
# Shared words of a token's staged block sums (8 used; 12: no bank conflicts).
SS = 12


def block_warps(tile_m: int, gate_up: bool) -> int:
    """Warps a block (16 weight rows each, a row tile; :func:`row_tiles`): 8
    for the down projection with tiles of 32 tokens or more, else
    :data:`~numba_moe.cuda.mma.WARPS` (4).

    A block stages its tokens' activations (fp16 pairs, 4 bytes a value)
    for all the rows it computes; down rows are only 768 values, so a
    32-token tile's 96 KB of activations against 64 rows' 40 KB of Q6_K
    weights dominated what a block reads.  128 rows a block halve it.  H100,
    Qwen3-30B-A3B layer, 4 / 8 warps (two rounds, one process): down phase
    T=512 (tiles of 32) 385 / 313-318 us, T=4096 (64-token plan blocks in
    parts of 32) 1491 / 1434-1448; T=64 (tiles of 8) 111.9 / 114.5; the
    gate / up kernel lost with 8 (T=512 436-447 / 471-479, T=4096 1619-1638
    / 1725; its rows are 2048 values, and it holds gate and up rows).
    """
    return 8 if not gate_up and tile_m >= 32 else WARPS


def row_tiles(tile_m: int, gate_up: bool) -> int:
    """16-row tiles a warp holds: 2 (32 weight rows) for the down projection
    with tiles of 8 or 16 tokens, else 1.

    Each 16-byte shared load of a token tile's activations then feeds the
    products of both row tiles.  Offline ptxas (sm_90, 3 blocks of 4
    warps): 167-168 registers for Q6_K, 162 for Q4_K, no spills.  H100,
    Qwen3-30B-A3B layer, one process, three rounds, down phase / whole
    forward, 1 / 2 row tiles: T=32 (tiles of 8) 76.4 / 68.6 us, 322-323 /
    307-308; T=64 (8) 122.4 / 112.6, 324-325 / 314-315; T=96 (16) 173.3 /
    145.6, 417-424 / 393-394; T=128 (16) 191.4 / 163.3, 393-395 / 379-391.
    Slower elsewhere: the down projection with 32-token tiles (T=512 down
    phase 310 us; two row tiles in 4 warps 317, in 8 warps 335) and the
    gate / up kernel, whose two row tiles hold twice the accumulators and
    spill (gate / up phase T=64 143 / 146 us, T=512 429 / 469).
    """
    return 2 if not gate_up and tile_m <= 16 else 1


def hmma_layout(rows: int, tile_m: int, gate_up: bool):
    """``(threads, n_blocks)`` of a launch of :func:`hmma_kernel` for ``rows``
    output rows (:func:`~numba_moe.cuda.mma.mma_layout` with
    :func:`block_warps` warps of :func:`row_tiles` row tiles)."""
    return mma_layout(rows, block_warps(tile_m, gate_up), row_tiles(tile_m, gate_up))


def min_blocks(tile_m: int, gate_up: bool) -> int:
    """Register budget: blocks of :func:`block_warps` warps a multiprocessor
    must fit.

    Kernels with few accumulators take 4 blocks of 4 warps (128 registers:
    more warps to hide latency), larger ones and warps of two row tiles 3
    (170); blocks of 8 warps 2 (128 registers).  H100, whole forward with the
    session-6 kernels: T=64 (tile 8) 377 / 407 us at 4 / 5 blocks, T=128
    (tile 16) 446 / 518; T=512 (tile 32) gate / up 404 / 439 us at 3 / 4,
    down 359 / 324.  (Session 4: T=64 600 / 568 / 571 / 605 at 3 / 4 / 5 /
    6, T=256 (tile 32) 868 / 910 / 1235 at 3 / 4 / 5, T=512 (tile 64) 1277 /
    1298 / 1636.)
    """
    if block_warps(tile_m, gate_up) == 8:
        return 2
    if row_tiles(tile_m, gate_up) == 2:
        return 3
    return 4 if tile_m <= 16 or (tile_m <= 32 and not gate_up) else 3


def _f16x2(v: float) -> uint32:
    """The fp16 pair ``(v, v)`` as a word."""
    return uint32(int(np.array([v, v], np.float16).view(np.uint32)[0]))


# fp16 pairs: 1.0, -1024, -1056 (= -(1024 + 32)), -1152 (= -(1024 + 128));
# the exponent of 1024 over a small integer, in one fp16 or in every byte
_ONE2 = _f16x2(1.0)
_M1024 = _f16x2(-1024.0)
_M1056 = _f16x2(-1056.0)
_M1152 = _f16x2(-1152.0)
_MAG = uint32(0x64006400)
_MAG8 = uint32(0x64646464)
_SIGN8 = uint32(0x80808080)
_EVEN8 = uint32(0xFEFEFEFE)
# the low 4 / 8 bits of each fp16 half of a word
_LOW4 = uint32(0x000F000F)
_LOW8 = uint32(0x00FF00FF)


def _pair_low(b: int) -> int:
    """``prmt`` selector: byte ``b`` of the first word under the second's
    byte 0 (0x64 in :data:`_MAG8`), in both halves: ``half2(1024 + byte)``."""
    return 0x4040 | b | b << 8


def _pair_high(b: int) -> int:
    """``prmt`` selector: byte ``b`` of the first word over a zero byte of
    the second (0), in both halves: ``byte << 8`` in each half."""
    return 0x0404 | b << 4 | b << 12


_cache = {}


def hmma_kernel(qtype, gate_up: bool, tile_m: int, part_shift: int = 0):
    """The fp16 tensor-core kernel for weights of type ``qtype`` (one of :data:`TYPES`).

    Signature::

        kernel[m_blocks * n_blocks, 32 * block_warps(tile_m, gate_up), stream](
            wa, wb, wc, wd, va, vb, vc, vd, nb, n_steps, rows, hx, hsum, xs, cols,
            num_pairs, top_k, sorted_ids, block_expert, meta, pairs_by_token, out, row_fast)

    ``nb`` blocks of 256 values a row, ``n_steps`` = ``cols / 16``; ``hx``,
    ``hsum``, ``xs``: the input rows split by :mod:`.actsplit`; input row of
    pair ``p``: token ``p // top_k`` (gate_up) or slot ``pairs_by_token[p]``
    (plain); output row: that slot.  ``tile_m`` (a multiple of 8) is the
    plan's block size; ``n_blocks`` from :func:`hmma_layout`; ``row_fast`` the block
    order (:func:`~numba_moe.cuda.mma.row_blocks_fast`).  With ``part_shift``
    the plan's blocks are ``2**part_shift`` times ``tile_m`` tokens, each
    taken in that many parts (``m_blocks`` counts parts;
    :func:`~numba_moe.cuda.mma.tile_head`).
    """
    key = (qtype, gate_up, tile_m, part_shift)
    if key not in _cache:
        _cache[key] = _make(qtype, gate_up, tile_m, part_shift)
    return _cache[key]


# Q4_K (layout in :mod:`.decoders`): step ks of a row is sub-block
# sb = (ks & 15) >> 1 of block ks >> 4, the low (even sb) or high nibbles of
# the 32 bytes of group sb >> 1, bytes 16 (ks & 1) .. + 15; lane i takes
# the word of bytes 4i .. 4i + 3 (columns 4i .. 4i + 3 of the step).
# Steps ks and ks + 2 (ks & 2 == 0) read the same word's two nibbles.


@device_inline
def _q4k_word(w, base, ks):
    """The word of step ``ks`` (int32) of the row and lane whose first is ``w[base]``."""
    return load1(w, base + int32(36 * (ks >> 4) + 8 * ((ks & 15) >> 2) + 4 * (ks & 1)))


@device_inline
def _q4k_frags(w, shift, sc2, nsc2):
    #   byte b of w: nibble n_b at bit shift
    #   p = half2(1024 + n_0, 1024 + n_2),  q = half2(1024 + n_1, 1024 + n_3)
    #   (1024 + n) * sc - 1024 * sc = n * sc, rounded once: exact (<= 945)
    n = (w >> shift) & _B4
    p = (n & _LOW4) | _MAG
    q = ((n >> uint32(8)) & _LOW4) | _MAG
    return hfma2(p, sc2, nsc2), hfma2(q, sc2, nsc2)


# Q6_K (planes in :mod:`.weights`: ql, qh, scales, d): step ks of a row is
# half n = (ks & 15) >> 3 of block ks >> 4, table row t = (ks & 7) >> 1,
# l = 16 (ks & 1) + 4i .. + 3: ql bytes 64n + 32 (t & 1) + l (nibble t >> 1),
# qh bytes 32n + l (bits 2t, 2t + 1); scale byte 8n + (ks & 1) + 2t.
# Within a half, steps ks and ks + 4 read the same ql word and all 8 steps
# the same two qh words.


# the ql / qh word of step ks (int32) of the row and lane whose first is at base
@device_inline
def _q6k_ql(wa, base, ks):
    return load1(wa, base + int32(32 * (ks >> 4) + 16 * ((ks & 15) >> 3) + 8 * ((ks >> 1) & 1)
                                  + 4 * (ks & 1)))


@device_inline
def _q6k_qh(wb, base, ks):
    return load1(wb, base + int32(16 * (ks >> 4) + 8 * ((ks & 15) >> 3) + 4 * (ks & 1)))


@device_inline
def _q6k_frags(ql, qh, t, e2, o2):
    #   6-bit code c_b of byte b: ql nibble (bit 4 (t >> 1)) | qh bits 2t .. 2t+1 << 4
    #   c - 32 exactly: half(1024 + c) * 1 - 1056
    #   A1 = (sc & ~1) (c - 32): even, |.| <= 4096, exact;  A2 = (sc & 1) (c - 32)
    #   (e2, o2: the fp16 pairs of sc & ~1 and sc & 1)
    c = ((ql >> uint32(4 * (t >> 1))) & _B4) | (((qh >> uint32(2 * t)) & _B2) << uint32(4))
    p = hfma2((c & _LOW8) | _MAG, _ONE2, _M1056)
    q = hfma2(((c >> uint32(8)) & _LOW8) | _MAG, _ONE2, _M1056)
    return hfma2(p, e2, 0), hfma2(q, e2, 0), hfma2(p, o2, 0), hfma2(q, o2, 0)


def stage_steps(tile_m: int) -> int:
    """Steps (16 columns each) of activation words a block stages at a time:
    the two stage buffers of a block stay within 48 KiB of shared memory."""
    return 8 if tile_m <= 32 else 4


def rescaled(tile_m: int, gate_up: bool) -> bool:
    """Whether the kernel keeps a row's sum in units of its block scale
    (``acc *= D / d``) instead of in a second set of accumulators.

    It halves the accumulator registers, which pays where they are many:
    gate / up with 64-token tiles (64 accumulators a lane; H100, T=4096:
    gate/up 3152 -> 2667 us).  With fewer the rescaling costs more than it
    saves: T=512 (tile 32) gate/up 594 -> 637 us, T=4096 down 2763 -> 2890,
    T=64 (tile 8) gate/up 268 -> 290.
    """
    return (2 if gate_up else 1) * row_tiles(tile_m, gate_up) * tile_m // 8 * 4 >= 64


def _source(q4: bool, tile_m: int, gate_up: bool, part_shift: int) -> str:
    """Python source of the kernel, its steps, token tiles and accumulators written out."""
    rs = rescaled(tile_m, gate_up)
    st = stage_steps(tile_m)
    streams = STREAMS[Q.Q4_K if q4 else Q.Q6_K]
    # a step's word slot, kss % fresh, is the same in every stage
    assert all(st % stream[4] == 0 for stream in streams)
    xsw = 16 * st + 16
    ntiles = tile_m // 8
    halves = range(2 if gate_up else 1)
    plane = [("wa", "wb", "wc", "wd"), ("va", "vb", "vc", "vd")]
    # a warp's row tiles: lane rows g + 8 r, r < 2 * tiles (tile m: r = 2m, 2m + 1)
    tiles = range(row_tiles(tile_m, gate_up))
    hr = [(h, r) for h in halves for r in range(2 * len(tiles))]
    lines = []
    emit = lines.append
    emit("""
def kernel(wa, wb, wc, wd, va, vb, vc, vd, nb, n_steps, rows, hx, hsum, xsc, cols,
           num_pairs, top_k, sorted_ids, block_expert, meta, pairs_by_token, out, row_fast):""")
    warps = block_warps(tile_m, gate_up)
    emit(tile_head(tile_m, gate_up, True, part_shift, warps, len(tiles)))
    emit(f"""    n_stages = n_steps // {st}
    # two stage buffers: the next stage copies in (cp.async) while this one computes
    xs = cuda.shared.array({2 * tile_m * xsw}, uint32)""")
    if q4:
        emit(f"    ss = cuda.shared.array({2 * tile_m * SS}, uint32)")

    # A stage is `per` 16-byte copies a token row; thread tid copies number
    # cu / 4 of rows cm + k * rpp (its rows and columns fixed: no index
    # arithmetic but the stage's offset a copy); ``xoff_s``: input row offsets.
    nt = 32 * warps
    per = 4 * st
    assert nt % per == 0 and tile_m * per % nt == 0
    rpp = nt // per
    emit(f"""    xoff_s = cuda.shared.array({tile_m}, int64)
    for m in range(tid, {tile_m}, {nt}):
        xoff_s[m] = int64(xrow_s[m]) * cols
    cuda.syncthreads()
    cm = tid >> {per.bit_length() - 1}
    cu = 4 * (tid & {per - 1})""")

    def issue(ind, stage, buf):
        for k in range(tile_m * per // nt):
            m = f"cm + {k * rpp}"
            emit(f"{ind}cp_async16(xs, ({buf} * {tile_m} + {m}) * {xsw} + cu, hx, "
                 f"xoff_s[{m}] + {16 * st} * ({stage}) + cu)")
        if q4:
            # a block's first stage brings the block's sums: 2 copies a token
            # row (sbw = cols / 32 words a row)
            emit(f"""{ind}if (({stage}) * {st}) & 15 == 0:
{ind}    sbi = (({stage}) * {st}) >> 4""")
            for k in range(-(-tile_m * 2 // nt)):
                m = f"(tid >> 1) + {k * nt // 2}"
                cond = "" if tile_m * 2 >= nt else f"if tid < {tile_m * 2}: "
                emit(f"{ind}    {cond}cp_async16(ss, ((sbi & 1) * {tile_m} + {m}) * {SS} + "
                     f"4 * (tid & 1), hsum, (xoff_s[{m}] >> 5) + 8 * sbi + 4 * (tid & 1))")

    def headers(ind, pre, sb):
        for h, r in hr:
            if q4:
                emit(f"{ind}{pre}{h}{r}_0, {pre}{h}{r}_1, {pre}{h}{r}_2, {pre}{h}{r}_3 = "
                     f"load4({plane[h][0]}, (row{r} * nb + {sb}) * 36)")
            else:
                emit(f"{ind}{pre}{h}{r}_0, {pre}{h}{r}_1, {pre}{h}{r}_2, {pre}{h}{r}_3 = "
                     f"load4({plane[h][2]}, (row{r} * nb + {sb}) * 4)")
                emit(f"{ind}{pre}{h}{r}_d = {plane[h][3]}[row{r} * nb + {sb}]")

    def load(ind, stream, h, r, j, step):
        name, loader, pl = stream[:3]
        emit(f"{ind}{name}{h}{r}_{j} = {loader}({plane[h][pl]}, b{name}{r}, int32({step}))")

    # a row's first word of each stream (gate and up rows alike): the step's
    # offset is then int32 arithmetic shared by all rows
    for name, *_, words, first in streams:
        for r in range(2 * len(tiles)):
            emit(f"    b{name}{r} = row{r} * nb * {words} + {first} + i")

    issue("    ", "0", "0")
    emit("    cp_async_commit()")
    for h in halves:
        for m in tiles:
            for n in range(ntiles):
                for pre in ("c",) if rs else ("t", "c"):
                    emit("    " + " = ".join(f"{pre}{h}_{m}_{n}_{k}" for k in range(4))
                         + " = float32(0)")
    if rs:
        # a row's accumulators hold its sum in units of D, the last nonzero block scale
        for h, r in hr:
            emit(f"    D{h}{r} = float32(1)")
    # weight words a group ahead (and the group in use: c<name>), block headers one block ahead
    for stream in streams:
        name, fresh = stream[0], stream[4]
        for j in range(fresh):
            for h, r in hr:
                load("    ", stream, h, r, j, f"min({j}, n_steps - 1)")
                emit(f"    c{name}{h}{r}_{j} = uint32(0)")
    headers("    ", "n", "0")
    emit(f"""    for s in range(n_stages):
        ks0 = s * {st}
        kq = ks0 & 15
        if s + 1 < n_stages:""")
    issue("            ", "s + 1", "((s + 1) & 1)")
    emit("""        cp_async_commit()
        cp_async_wait1()
        cuda.syncthreads()
        buf = s & 1
        if kq == 0:""")
    for h, r in hr:
        names = [f"{h}{r}_{x}" for x in ("0", "1", "2", "3")] + ([] if q4 else [f"{h}{r}_d"])
        emit("            " + ", ".join(f"k{v}" for v in names) + " = "
             + ", ".join(f"n{v}" for v in names))
    headers("            ", "n", "min((ks0 >> 4) + 1, nb - 1)")
    for h, r in hr:
        if q4:
            emit(f"            d{h}{r}, dm{h}{r} = half2_f32(k{h}{r}_0)")
        else:
            emit(f"            d{h}{r} = float32(k{h}{r}_d)")
        if not rs:
            continue
        # a zero d drops the block's products (z = 0) and keeps the unit D
        emit(f"""            z{h}{r} = int32(0)
            f = float32(1)
            if d{h}{r} != float32(0):
                z{h}{r} = int32(1)
                f = D{h}{r} / d{h}{r}
                D{h}{r} = d{h}{r}""")
        for n in range(ntiles):
            for k in (2 * (r & 1), 2 * (r & 1) + 1):
                emit(f"            c{h}_{r >> 1}_{n}_{k} *= f")
    # the stage's sub-block scales, one per byte (a zero-d block's zeroed
    # when rescaling): Q4_K sw, byte k sub-block (kq >> 1) + k; Q6_K, scale
    # byte kk of the block (step kk's) in word kk >> 2, as se = (sc & ~1) +
    # 128 and so = 0x3C (sc & 1) (the high byte of fp16 1.0)
    for h, r in hr:
        zm = f" * uint32(z{h}{r})" if rs else ""
        if q4:
            emit(f"        sw{h}{r}, _ = kq_scale_words(k{h}{r}_1, k{h}{r}_2, k{h}{r}_3, kq >> 1)")
            if rs:
                emit(f"        sw{h}{r} *= uint32(z{h}{r})")
            continue
        for j in range(st // 4):
            emit(f"""        w = _pick4((kq >> 2) + {j}, k{h}{r}_0, k{h}{r}_1, k{h}{r}_2, k{h}{r}_3){zm}
        se{h}{r}_{j} = (w ^ _SIGN8) & _EVEN8
        so{h}{r}_{j} = (w & _B1) * uint32(0x3C)""")
    ind = " " * 8
    for kss in range(st):
        if any(st % stream[3] for stream in streams):
            emit(f"{ind}kk = kq + {kss}")
        for stream in streams:
            name, _, _, period, fresh = stream[:5]
            j = kss % fresh
            # whether the step starts using new words: known here unless a
            # stage is shorter than the group
            if st % period == 0:
                if kss % period >= fresh:
                    continue
                wi = ind
            else:
                emit(f"{ind}if (kk & {period - 1}) < {fresh}:")
                wi = ind + "    "
            for h, r in hr:
                emit(f"{wi}c{name}{h}{r}_{j} = {name}{h}{r}_{j}")
                load(wi, stream, h, r, j, f"min(ks0 + {kss + period}, n_steps - 1)")
        if q4:
            if kss % 2 == 0:
                for h, r in hr:
                    # (sc, sc) = half2(1024 + sc) - 1024, and -1024 sc: exact
                    # fp16 arithmetic (|sc| <= 63), no integer conversion
                    emit(f"{ind}s2{h}{r} = hfma2(prmt(sw{h}{r}, _MAG8, {_pair_low(kss >> 1)}), "
                         f"_ONE2, _M1024)\n{ind}n2{h}{r} = hfma2(s2{h}{r}, _M1024, 0)")
            for h, r in hr:
                shift = 4 * ((kss >> 1) & 1)
                emit(f"{ind}x{h}{r}, y{h}{r} = _q4k_frags(cw{h}{r}_{kss % 2}, uint32({shift}), "
                     f"s2{h}{r}, n2{h}{r})")
        else:
            # table row (kk & 7) >> 1: a constant when stages are whole halves
            tq = f"{(kss & 7) >> 1}" if st % 8 == 0 else f"((kq & 7) + {kss}) >> 1"
            j, b = kss >> 2, kss & 3
            for h, r in hr:
                emit(f"""{ind}e2 = hfma2(prmt(se{h}{r}_{j}, _MAG8, {_pair_low(b)}), _ONE2, _M1152)
{ind}o2 = prmt(so{h}{r}_{j}, 0, {_pair_high(b)})
{ind}x{h}{r}, y{h}{r}, u{h}{r}, v{h}{r} = _q6k_frags(cl{h}{r}_{kss % 4}, cq{h}{r}_{kss % 2}, {tq}, e2, o2)""")
        for n in range(ntiles):
            emit(f"{ind}b{n}_0, b{n}_1, b{n}_2, b{n}_3 = shared_load4(xs, (buf * {tile_m} + "
                 f"{8 * n} + g) * {xsw} + {16 * kss} + 4 * i)")
        # independent products back to back: term, then hi / lo, then tile and
        # half; Q6_K's A2 only against the hi halves (A2 lo: see the docstring)
        terms = [("x", "y", 2)] if q4 else [("x", "y", 2), ("u", "v", 1)]
        for pa, qa, n_b in terms:
            for b0, b1 in ((0, 1), (2, 3))[:n_b]:
                for n in range(ntiles):
                    for h in halves:
                        for m in tiles:
                            acc = ", ".join(f"c{h}_{m}_{n}_{k}" for k in range(4))
                            ra, rb = 2 * m, 2 * m + 1
                            frag = f"{pa}{h}{ra}, {pa}{h}{rb}, {qa}{h}{ra}, {qa}{h}{rb}"
                            emit(f"{ind}{acc} = mma_f16({frag}, b{n}_{b0}, b{n}_{b1}, {acc})")
    if q4 or not rs:
        # end of a 256-column block: the minimums against the activations'
        # sums (Q4_K); without rescaling, the block's sums scaled into the
        # running ones
        emit(f"{ind}if kq == {16 - st}:")
        ind = " " * 12
        if q4:
            emit(f"{ind}sbuf = (ks0 >> 4) & 1")
            for h, r in hr:
                dz = f"dm{h}{r} / D{h}{r}" if rs else f"dm{h}{r}"
                emit(f"""{ind}_, ma = kq_scale_min(k{h}{r}_1, k{h}{r}_2, k{h}{r}_3, 2 * i)
{ind}_, mz = kq_scale_min(k{h}{r}_1, k{h}{r}_2, k{h}{r}_3, 2 * i + 1)
{ind}am{h}{r} = pack_half2(float32(ma), float32(mz))
{ind}dz{h}{r} = float32(32) * {dz}""")
        for n in range(ntiles):
            if q4:
                emit(f"{ind}so = (sbuf * {tile_m} + {8 * n} + g) * {SS} + 2 * i")
                emit(f"{ind}sh = ss[so]\n{ind}sl = ss[so + 1]")
            for h in halves:
                for m in tiles:
                    ra, rb = 2 * m, 2 * m + 1
                    if q4:
                        emit(f"{ind}m0, m1, m2, m3 = mma_f16_k8(am{h}{ra}, am{h}{rb}, sh, "
                             f"0, 0, 0, 0)")
                        emit(f"{ind}m0, m1, m2, m3 = mma_f16_k8(am{h}{ra}, am{h}{rb}, sl, "
                             f"m0, m1, m2, m3)")
                    for k in range(4):
                        r = 2 * m + (k >> 1)
                        c = f"c{h}_{m}_{n}_{k}"
                        sub = f" - dz{h}{r} * m{k}" if q4 else ""
                        if rs:
                            emit(f"{ind}{c} -= dz{h}{r} * m{k}")
                        else:
                            emit(f"{ind}t{h}_{m}_{n}_{k} += d{h}{r} * {c}{sub}")
                            emit(f"{ind}{c} = float32(0)")
    emit("        cuda.syncthreads()")
    for n, m, k in ((n, m, k) for n in range(ntiles) for m in tiles for k in range(4)):
        r = 2 * m + (k >> 1)
        tok = f"{8 * n} + 2 * i + {k & 1}"
        acc = [f"(D{h}{r} * c{h}_{m}_{n}_{k})" if rs else f"t{h}_{m}_{n}_{k}" for h in halves]
        val = f"silu(sx * {acc[0]}) * (sx * {acc[1]})" if gate_up else f"sx * {acc[0]}"
        emit(f"""    orow = orow_s[{tok}]
    if orow >= 0 and r{r} < rows:
        sx = xsc_s[{tok}]
        out[int64(orow) * rows + r{r}] = {val}""")
    return "\n".join(lines) + "\n"


def _make(qtype, gate_up: bool, tile_m: int, part_shift: int):
    src = _source(qtype == Q.Q4_K, tile_m, gate_up, part_shift)
    ns = dict(cuda=cuda, float32=float32, int32=int32, int64=int64, uint32=uint32,
              load4=load4, shared_load4=shared_load4, half2_f32=half2_f32,
              pack_half2=pack_half2, mma_f16=mma_f16, mma_f16_k8=mma_f16_k8, silu=silu,
              kq_scale_min=kq_scale_min, _q4k_word=_q4k_word, kq_scale_words=kq_scale_words,
              _q4k_frags=_q4k_frags, _q6k_ql=_q6k_ql, _q6k_qh=_q6k_qh, _q6k_frags=_q6k_frags,
              _ONE2=_ONE2, _M1024=_M1024, _M1152=_M1152, _MAG8=_MAG8, _SIGN8=_SIGN8,
              _EVEN8=_EVEN8, _B1=_B1, hfma2=hfma2, prmt=prmt, _pick4=_pick4, cp_async16=cp_async16,
              cp_async_commit=cp_async_commit, cp_async_wait1=cp_async_wait1)
    exec(compile(src, f"<hmma {qtype.name} gate_up={gate_up} tile_m={tile_m}"
                      f" part_shift={part_shift}>", "exec"), ns)
    return kernel_jit(launch_bounds=(32 * block_warps(tile_m, gate_up),
                                     min_blocks(tile_m, gate_up)))(ns["kernel"])

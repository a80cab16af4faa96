"""AVX-512 block dot products (x86 only, chosen at import).

Weight rows times activation rows with the vector shape spelled out in LLVM
IR instead of left to the vectorizer, in two forms:

* direct (:func:`dot_row_q4_k_avx512`, :func:`dot_row_q6_k_avx512`): straight
  from the GGUF blocks, for experts with few tokens.  Per 256-value block
  the codes are unpacked into 32 int16 lanes with shifts and masks, scaled
  by their sub-block scale (``vpmullw``) and multiplied with the 12-bit
  activation codes of :mod:`numba_moe.cpu.actquant` by
  ``llvm.x86.avx512.pmaddw.d.512`` plus an add, which LLVM fuses into
  ``vpdpwssd`` on CPUs with AVX512-VNNI.  Q4_K reads its nibbles as 16-bit
  words (no byte-to-word shuffle) against activation codes stored in the
  matching order (:data:`Q4_K_ORDER`, one reordered copy per token);
* decoded (:func:`dot_decoded_avx512`): a row unpacked by
  :mod:`numba_moe.cpu.rowdecode`, for experts with many tokens.

Both compute the same integers per block and end every block with the same
float operations in a fixed order (flagged so that Numba's fastmath pass
leaves them alone, see ``_STRICT``), so they round identically: the forward
may pick the form per expert and a token's output still does not depend on
the batch, bit for bit.  The portable kernels round differently.

Why not the loop form: Numba's loops reach the same instructions but LLVM
keeps 256-bit vectors, chains every product of a block on one accumulator,
broadcasts each sub-block scale with two shuffles and unpacks them in scalar
code.  Measured on the CI machine (Zen 4, one thread, rows in cache):
2048-value Q4_K rows 83 ns against 130 ns for
:func:`~numba_moe.cpu.blockdot.dot_row_q4_k`; 768-value Q6_K rows 36-47 ns
against 60-75 ns for decode + :func:`~numba_moe.cpu.rowdot.dot_kquant`.

Why ``vpmaddwd`` and not ``vpdpbusd`` (u8 x s8): 8-bit activation codes
would cost ten times the rounding error, and a 12-bit code split into two
byte planes needs two ``vpdpbusd`` per 64 weights: as many multiplies as
the int16 form, plus the per-sub-block scaling in int32.

Dispatch: :data:`AVAILABLE` is read from the host CPU features once at
import (``avx512f``, ``avx512bw``; ``f16c`` for the fp16 scales).  The
kernels take a ``simd`` argument, ``None`` on the portable path, and these
functions are only typed (hence compiled) when it is not ``None``: a CPU
without AVX-512 never sees the intrinsics.  ``NUMBA_MOE_SIMD=0``
(``config.simd``) forces the portable path, which the tests also run on
AVX-512 machines.
"""
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..config import get_config
from ..threading_guard import parallel_launch
from .actquant import SERIAL_MAX_VALUES

__all__ = ["AVAILABLE", "Q4_K_ORDER", "simd_flag", "q4_k_order_into", "dot_row_q4_k_avx512",
           "dot_row_q6_k_avx512", "dot_decoded_avx512", "dot_decoded_2x2_avx512"]


def _host_has_avx512() -> bool:
    feats = llvm.get_host_cpu_features()
    return all(feats.get(f, False) for f in ("avx512f", "avx512bw", "f16c"))


#: Whether this host runs the kernels of this module.
AVAILABLE = _host_has_avx512()


def _q4_k_order():
    # Lane k of a 256-block in the direct Q4_K form multiplies activation
    # Q4_K_ORDER[k]: chunk c (qs columns 2c, 2c+1), part v (A B C D of
    # _q4_k_block: v % 2 odd byte, v // 2 high nibble), lane i (column
    # 2c + i // 16, byte 2 (i % 16) + v % 2 of it).
    order = np.empty(256, dtype=np.int64)
    for c in range(2):
        for v in range(4):
            for i in range(32):
                order[128 * c + 32 * v + i] = (64 * (2 * c + i // 16) + 32 * (v // 2)
                                               + 2 * (i % 16) + v % 2)
    return order


#: Order of the activation codes :func:`dot_row_q4_k_avx512` reads in every
#: 256-value block (a permutation inside each 32-value sub-block).
Q4_K_ORDER = _q4_k_order()


def simd_flag():
    """The kernels' ``simd`` argument: True when this host has AVX-512 and
    ``config.simd`` is on, else None (the portable specialization)."""
    return True if AVAILABLE and get_config().simd else None

_I8, _I16, _I32, _I64, _F32 = (ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64),
                               ir.FloatType())
_V32xI8 = ir.VectorType(_I8, 32)
_V32xI16 = ir.VectorType(_I16, 32)
_V16xI32 = ir.VectorType(_I32, 16)


def _item_ptr(context, builder, sig, args, which, elt):
    """Pointer to ``args[which[0]][args[which[1:]]]`` (no bounds or wrap-around
    checks; the wrappers validated the shapes) as ``elt*``."""
    aryty = sig.args[which[0]]
    a = context.make_array(aryty)(context, builder, args[which[0]])
    inds = [context.cast(builder, args[i], sig.args[i], types.intp) for i in which[1:]]
    p = cgutils.get_item_pointer(context, builder, aryty, a, inds, wraparound=False)
    return builder.bitcast(p, elt.as_pointer())


def _load(builder, base, offset, ty, align):
    """``*(ty *)(base + offset)`` with ``base`` an ``i8*`` / ``i16*``."""
    p = builder.gep(base, [ir.Constant(_I64, offset)])
    return builder.load(builder.bitcast(p, ty.as_pointer()), align=align)


def _lanes(builder, vec, pattern):
    """``<len(pattern) x T>`` whose lane ``i`` is lane ``pattern[i]`` of ``vec``."""
    return builder.shuffle_vector(vec, ir.Constant(vec.type, None),
                                  ir.Constant(ir.VectorType(_I32, len(pattern)), list(pattern)))


def _splat16(v):
    return ir.Constant(_V32xI16, [v] * 32)


def _madd(builder, w, a):
    """``pmaddwd``: adjacent int16 products summed into int32 lanes."""
    fn = cgutils.get_or_insert_function(builder.module,
                                        ir.FunctionType(_V16xI32, [_V32xI16, _V32xI16]),
                                        "llvm.x86.avx512.pmaddw.d.512")
    return builder.call(fn, [w, a])


def _reduce_add(builder, v):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_V16xI32]),
                                        "llvm.vector.reduce.add.v16i32")
    return builder.call(fn, [v])


def _half(builder, base, offset):
    """fp16 at ``base + offset`` as float32 (``vcvtph2ps``)."""
    return builder.fpext(_load(builder, base, offset, ir.HalfType(), 1), _F32)


# Float operations of the block epilogue carry the flag ``arcp`` (reciprocal
# approximations: meaningless without a division).  Numba's fastmath pass
# only flags float operations that have no flag yet, so these stay plain
# IEEE operations in a given order, never reassociated or contracted into
# FMAs: the direct and the decoded forms below then round identically.
_STRICT = ("arcp",)


def _strict(builder, op, a, b):
    return getattr(builder, op)(a, b, flags=_STRICT)


def _hsum8(builder, v):
    """Sum of an ``<8 x float>``: halves, quarters, then the last pair."""
    v = _strict(builder, "fadd", _lanes(builder, v, range(4)), _lanes(builder, v, range(4, 8)))
    v = _strict(builder, "fadd", _lanes(builder, v, range(2)), _lanes(builder, v, range(2, 4)))
    return _strict(builder, "fadd", builder.extract_element(v, ir.Constant(_I32, 0)),
                   builder.extract_element(v, ir.Constant(_I32, 1)))


def _accumulate(builder, f, d, ad, acc, dmins=None, amb=None):
    """``f + d * ad * sum(acc) [- sum(dmins * amb)]``: the end of every block.

    ``acc`` <16 x i32> integer products; ``dmins``, ``amb`` <8 x float> the
    ``dmin * m`` of the eight sub-blocks and the activation sub-block sums
    (K-quants with mins).
    """
    dot = builder.sitofp(_reduce_add(builder, acc), _F32)
    v = _strict(builder, "fmul", _strict(builder, "fmul", d, ad), dot)
    if dmins is not None:
        v = _strict(builder, "fsub", v, _hsum8(builder, _strict(builder, "fmul", dmins, amb)))
    return _strict(builder, "fadd", f, v)


# Bytes ahead of the block being read that the direct Q4_K dot prefetches
# (two 2048-value rows).  Its rows stream from memory, but at ~100
# instructions per 144-byte block the out-of-order window holds too few
# loads to keep the memory busy; gate and up rows interleave, two streams.
# An x86 prefetch never faults, so running past the tensor's end is harmless.
_Q4_K_PREFETCH = 2304


def _prefetch(builder, base, offset, lines):
    """Prefetch (read, into all cache levels) ``lines`` cache lines at ``base + offset``."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]),
        "llvm.prefetch.p0")
    for k in range(lines):
        builder.call(fn, [builder.gep(base, [ir.Constant(_I64, offset + 64 * k)]),
                          ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _float_arg(context, builder, signature, args, i):
    return context.cast(builder, args[i], signature.args[i], types.float32)


def _load8f(builder, p):
    return builder.load(builder.bitcast(p, ir.VectorType(_F32, 8).as_pointer()), align=4)


@intrinsic
def _q4_k_block(typingctx, f, q, e, r, o, aq, t, x, amb, m, ad):
    """``f`` plus Q4_K block ``q[e, r, o:o+144]`` times activation codes
    ``aq[t, x:x+256]`` in :data:`Q4_K_ORDER` (block scale ``ad``, scaled
    sub-block sums ``amb[t, m:m+8]``): float32."""
    sig = types.float32(f, q, e, r, o, aq, t, x, amb, m, ad)

    def codegen(context, builder, signature, args):
        pb = _item_ptr(context, builder, signature, args, (1, 2, 3, 4), _I8)
        pa = _item_ptr(context, builder, signature, args, (5, 6, 7), _I16)
        pm = _item_ptr(context, builder, signature, args, (8, 6, 9), _F32)
        d = _half(builder, pb, 0)
        dmin = _half(builder, pb, 2)
        _prefetch(builder, pb, _Q4_K_PREFETCH, 3)
        # The 12 scale bytes @4 as words (see rowdecode._k4_scale_words):
        #   word 0: HHdddddd GGcccccc FFbbbbbb EEaaaaaa
        #   word 1: hhDDDDDD ggCCCCCC ffBBBBBB eeAAAAAA
        #   word 2: hhhhHHHH ggggGGGG ffffFFFF eeeeEEEE
        # -> 16 bytes: scales a..h, then mins A..H (sub-blocks 0..7).
        w = [_load(builder, pb, 4 + 4 * i, _I32, 1) for i in range(3)]
        c = lambda v: ir.Constant(_I32, v)  # noqa: E731
        m6, m4, m2 = c(0x3F3F3F3F), c(0x0F0F0F0F), c(0x03030303)
        words = (
            builder.and_(w[0], m6),
            builder.or_(builder.and_(w[2], m4),
                        builder.shl(builder.and_(builder.lshr(w[0], c(6)), m2), c(4))),
            builder.and_(w[1], m6),
            builder.or_(builder.and_(builder.lshr(w[2], c(4)), m4),
                        builder.shl(builder.and_(builder.lshr(w[1], c(6)), m2), c(4))),
        )
        v4 = ir.Constant(ir.VectorType(_I32, 4), None)
        for i, wd in enumerate(words):
            v4 = builder.insert_element(v4, wd, c(i))
        b16 = builder.bitcast(v4, ir.VectorType(_I8, 16))
        sc = builder.zext(_lanes(builder, b16, range(8)), ir.VectorType(_I16, 8))
        mins = builder.uitofp(_lanes(builder, b16, range(8, 16)), ir.VectorType(_F32, 8))
        dmins = _strict(builder, "fmul", _lanes(builder, builder.insert_element(
            ir.Constant(ir.VectorType(_F32, 1), None), dmin, c(0)), [0] * 8), mins)
        # qs[32j + l] = HHHHLLLL  ->  y[64j + l] = L * sc[2j],  y[64j + 32 + l] = H * sc[2j+1]
        # Read as 16-bit words, 64 bytes (columns j = 2c, 2c+1) at a time, the
        # nibbles need masks and shifts but no byte-to-word shuffle:
        #   word i of chunk c = qs[64c + 2i + 1] qs[64c + 2i] = HHHHLLLL HHHHLLLL
        #                                                      odd byte  even byte
        #   A = w & 15: L of even bytes    B = w >> 8 & 15: L of odd bytes
        #   C = w >> 4 & 15: H of even     D = w >> 12:     H of odd
        # lanes 0-15 from column 2c, 16-31 from 2c + 1; the activation codes
        # come in the matching order (Q4_K_ORDER).
        acc = None
        for ch in range(2):
            wv = _load(builder, pb, 16 + 64 * ch, _V32xI16, 1)
            parts = (builder.and_(wv, _splat16(15)),
                     builder.and_(builder.lshr(wv, _splat16(8)), _splat16(15)),
                     builder.and_(builder.lshr(wv, _splat16(4)), _splat16(15)),
                     builder.lshr(wv, _splat16(12)))
            s_lo = _lanes(builder, sc, [4 * ch] * 16 + [4 * ch + 2] * 16)
            s_hi = _lanes(builder, sc, [4 * ch + 1] * 16 + [4 * ch + 3] * 16)
            for v, part in enumerate(parts):
                wsc = builder.mul(part, s_lo if v < 2 else s_hi)
                p = _madd(builder, wsc, _load(builder, pa, 128 * ch + 32 * v, _V32xI16, 2))
                acc = p if acc is None else builder.add(acc, p)
        return _accumulate(builder, args[0], d, _float_arg(context, builder, signature, args, 10),
                           acc, dmins, _load8f(builder, pm))

    return sig, codegen


@intrinsic
def _q6_k_block(typingctx, f, q, e, r, o, aq, t, x, ad):
    """``f`` plus Q6_K block ``q[e, r, o:o+210]`` times ``aq[t, x:x+256]``
    (block scale ``ad``): float32."""
    sig = types.float32(f, q, e, r, o, aq, t, x, ad)

    def codegen(context, builder, signature, args):
        pb = _item_ptr(context, builder, signature, args, (1, 2, 3, 4), _I8)
        pa = _item_ptr(context, builder, signature, args, (5, 6, 7), _I16)
        d = _half(builder, pb, 208)
        sc = builder.sext(_load(builder, pb, 192, ir.VectorType(_I8, 16), 1),
                          ir.VectorType(_I16, 16))
        acc = None
        for n in range(2):
            # a = ql[64n + l]   c = ql[64n + 32 + l]   h = qh[32n + l] = h3 h2 h1 h0
            # y[128n + 32k + l] = (nibble of a or c) | hk << 4, minus 32;
            # scale scales[8n + 2k] for l < 16, scales[8n + 2k + 1] above.
            a = builder.zext(_load(builder, pb, 64 * n, _V32xI8, 1), _V32xI16)
            cc = builder.zext(_load(builder, pb, 64 * n + 32, _V32xI8, 1), _V32xI16)
            h = builder.zext(_load(builder, pb, 128 + 32 * n, _V32xI8, 1), _V32xI16)
            low = builder.and_(a, _splat16(15)), builder.and_(cc, _splat16(15)), \
                builder.lshr(a, _splat16(4)), builder.lshr(cc, _splat16(4))
            high = (builder.shl(builder.and_(h, _splat16(3)), _splat16(4)),
                    builder.shl(builder.and_(h, _splat16(12)), _splat16(2)),
                    builder.and_(h, _splat16(48)),
                    builder.lshr(builder.and_(h, _splat16(192)), _splat16(2)))
            for k in range(4):
                code = builder.sub(builder.or_(low[k], high[k]), _splat16(32))
                s = 8 * n + 2 * k
                w = builder.mul(code, _lanes(builder, sc, [s] * 16 + [s + 1] * 16))
                p = _madd(builder, w, _load(builder, pa, 128 * n + 32 * k, _V32xI16, 2))
                acc = p if acc is None else builder.add(acc, p)
        return _accumulate(builder, args[0], d, _float_arg(context, builder, signature, args, 8),
                           acc)

    return sig, codegen


def _decoded_tile(context, builder, signature, args, rows, toks, mins):
    """Blocks of decoded rows times blocks of activation rows, every pair.

    ``args`` of a ``_decoded_block*`` intrinsic: running sums (one tuple,
    row-major over rows x tokens), ``w16``, the buffer rows, ``x``, ``aq``,
    the token rows, their ``ad``, the rows' ``d``, then with ``mins``:
    ``dmins``, ``amb``, ``m``.  Each weight and activation vector is loaded
    once for the whole tile.  Returns the new sums, in the same order.
    """
    f = cgutils.unpack_tuple(builder, args[0], rows * toks)
    i_s, i_x = 2, 2 + rows
    i_aq, i_t = i_x + 1, i_x + 2
    i_ad, i_d = i_t + toks, i_t + 2 * toks
    pw = [_item_ptr(context, builder, signature, args, (1, i_s + i, i_x), _I16)
          for i in range(rows)]
    pa = [_item_ptr(context, builder, signature, args, (i_aq, i_t + k, i_x), _I16)
          for k in range(toks)]
    ad = [_float_arg(context, builder, signature, args, i_ad + k) for k in range(toks)]
    d = [_float_arg(context, builder, signature, args, i_d + i) for i in range(rows)]
    acc = [[None] * toks for _ in range(rows)]
    for j in range(8):
        wv = [_load(builder, pw[i], 32 * j, _V32xI16, 2) for i in range(rows)]
        av = [_load(builder, pa[k], 32 * j, _V32xI16, 2) for k in range(toks)]
        for i in range(rows):
            for k in range(toks):
                p = _madd(builder, wv[i], av[k])
                acc[i][k] = p if acc[i][k] is None else builder.add(acc[i][k], p)
    out = []
    for i in range(rows):
        dm = None
        if mins:
            i_dm = i_d + rows
            dm = _load8f(builder, _item_ptr(context, builder, signature, args,
                                            (i_dm, i_s + i, i_dm + 2), _F32))
        for k in range(toks):
            mb = None
            if mins:
                mb = _load8f(builder, _item_ptr(context, builder, signature, args,
                                                (i_d + rows + 1, i_t + k, i_d + rows + 2), _F32))
            out.append(_accumulate(builder, f[i * toks + k], d[i], ad[k], acc[i][k], dm, mb))
    return out


def _decoded(rows, toks, mins, argtypes):
    """Signature and codegen of a ``_decoded_block*`` intrinsic: adds block
    ``x // 256`` of ``rows`` decoded rows times ``toks`` activation rows to a
    tuple of running sums (see :func:`_decoded_tile`)."""

    def codegen(context, builder, signature, args):
        out = _decoded_tile(context, builder, signature, args, rows, toks, mins)
        return context.make_tuple(builder, signature.return_type, out)

    return types.UniTuple(types.float32, rows * toks)(*argtypes), codegen


@intrinsic
def _decoded_block(typingctx, f, w16, s, x, aq, t, ad, d):
    return _decoded(1, 1, False, (f, w16, s, x, aq, t, ad, d))


@intrinsic
def _decoded_block_mins(typingctx, f, w16, s, x, aq, t, ad, d, dmins, amb, m):
    return _decoded(1, 1, True, (f, w16, s, x, aq, t, ad, d, dmins, amb, m))


@intrinsic
def _decoded_block_2x2(typingctx, f, w16, s0, s1, x, aq, t0, t1, ad0, ad1, d0, d1):
    return _decoded(2, 2, False, (f, w16, s0, s1, x, aq, t0, t1, ad0, ad1, d0, d1))


@intrinsic
def _decoded_block_2x2_mins(typingctx, f, w16, s0, s1, x, aq, t0, t1, ad0, ad1, d0, d1, dmins,
                            amb, m):
    return _decoded(2, 2, True, (f, w16, s0, s1, x, aq, t0, t1, ad0, ad1, d0, d1, dmins, amb, m))


@njit(parallel=True, cache=True)
def _order_rows_parallel(q, n, out):
    for r in prange(n):
        for b in range(q.shape[1] // 256):
            for k in range(256):
                out[r, 256 * b + k] = q[r, 256 * b + Q4_K_ORDER[k]]


@njit(cache=True)
def _order_rows_serial(q, n, out):
    for r in range(n):
        for b in range(q.shape[1] // 256):
            for k in range(256):
                out[r, 256 * b + k] = q[r, 256 * b + Q4_K_ORDER[k]]


def q4_k_order_into(q, n, out):
    """Rows ``0 .. n-1`` of activation codes ``q`` (int16 [R, C], C a
    multiple of 256) into ``out`` in :data:`Q4_K_ORDER` (no validation)."""
    if n * q.shape[1] <= SERIAL_MAX_VALUES:
        _order_rows_serial(q, n, out)
    else:
        with parallel_launch():
            _order_rows_parallel(q, n, out)


@njit(inline="always", cache=True)
def dot_row_q4_k_avx512(q, e, r, nb, aq, ad, amb, t):
    """``q[e, r] . x[t]`` for a Q4_K row of ``nb`` blocks: float32.

    Arguments as :func:`~numba_moe.cpu.blockdot.dot_row_q4_k` without
    ``q32``, except that the codes ``aq`` are in :data:`Q4_K_ORDER`
    (:func:`q4_k_order_into`)."""
    f = np.float32(0.0)
    for b in range(nb):
        f = _q4_k_block(f, q, e, r, b * 144, aq, t, b * 256, amb, b * 8, ad[t, b])
    return f


@njit(inline="always", cache=True)
def dot_row_q6_k_avx512(q, e, r, nb, aq, ad, t):
    """``q[e, r] . x[t]`` for a Q6_K row of ``nb`` blocks (210 bytes each; layout as
    :func:`~numba_moe.cpu.rowdecode.decode_row_q6_k`) and a quantized activation row: float32."""
    f = np.float32(0.0)
    for b in range(nb):
        f = _q6_k_block(f, q, e, r, b * 210, aq, t, b * 256, ad[t, b])
    return f


@njit(inline="always", cache=True)
def dot_decoded_avx512(w16, dsc, dmins, s, with_mins, aq, ad, amb, t, nb):
    """:func:`~numba_moe.cpu.rowdot.dot_kquant` (same arguments) rounded exactly
    as :func:`dot_row_q4_k_avx512` (``with_mins``) or :func:`dot_row_q6_k_avx512`
    round the same row from its blocks."""
    f = (np.float32(0.0),)
    for b in range(nb):
        if with_mins:
            f = _decoded_block_mins(f, w16, s, b * 256, aq, t, ad[t, b], dsc[s, b], dmins, amb,
                                    b * 8)
        else:
            f = _decoded_block(f, w16, s, b * 256, aq, t, ad[t, b], dsc[s, b])
    return f[0]


@njit(inline="always", cache=True)
def dot_decoded_2x2_avx512(w16, dsc, dmins, s0, s1, with_mins, aq, ad, amb, t0, t1, nb):
    """Buffer rows ``s0``, ``s1`` times activation rows ``t0``, ``t1``: the four
    :func:`dot_decoded_avx512` results ``(s0.t0, s0.t1, s1.t0, s1.t1)``, bit for
    bit, with each vector loaded once for the four (1.5x faster per dot)."""
    z = np.float32(0.0)
    f = (z, z, z, z)
    for b in range(nb):
        x = b * 256
        if with_mins:
            f = _decoded_block_2x2_mins(f, w16, s0, s1, x, aq, t0, t1, ad[t0, b], ad[t1, b],
                                        dsc[s0, b], dsc[s1, b], dmins, amb, b * 8)
        else:
            f = _decoded_block_2x2(f, w16, s0, s1, x, aq, t0, t1, ad[t0, b], ad[t1, b],
                                   dsc[s0, b], dsc[s1, b])
    return f

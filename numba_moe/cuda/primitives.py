"""Warp-level building blocks of the CUDA kernels, each with a simulator twin.

The CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) runs every thread as a Python
thread and has no warp shuffles, no ``syncwarp`` and no inline PTX.  Each
primitive here therefore exists twice: the real one (shuffles, 16-byte
``ld.global.nc`` loads) and a twin with the same meaning built from shared
memory and ``syncthreads``.  Which one a kernel gets is fixed at import.

Contract for callers: the reductions and :func:`warp_sync` must be reached
by *every thread of the block* the same number of times (uniform control
flow).  On a GPU only the warp has to agree; the simulator twins synchronise
the whole block.  Blocks are one-dimensional.
"""
import math

import numpy as np
from llvmlite import ir
from numba import cuda, float32, float64, int32, int64, types
from numba.cuda.core import config as _cuda_config

__all__ = ["SIMULATOR", "device_inline", "kernel", "seg_sum", "warp_sum64", "warp_max64",
           "warp_argmax", "warp_sync", "load4", "load2", "load1", "store4",
           "shared_load4", "as_f32", "f32_bits", "half2_f32", "dp4a", "mma_s8_k32", "mma_f16",
           "mma_f16_k8", "hfma2", "prmt", "pack_half2", "cp_async16", "cp_async_commit",
           "cp_async_wait1", "pair_max", "silu", "block_exclusive_scan", "next_pow2"]

#: True when numba.cuda is the simulator (decided by numba at its import).
SIMULATOR = bool(_cuda_config.ENABLE_CUDASIM)

_FULL = 0xFFFFFFFF
# Largest block the simulator twins cover (their shared scratch size).
_MAX_THREADS = 1024


def device_inline(fn):
    """``@cuda.jit(device=True)``, forced inline on a GPU; for device functions
    that use no ``cuda.*`` intrinsic.

    Inlining lets LLVM turn the small local arrays the decoders fill into
    registers.  Under the simulator the function stays plain Python: such
    functions need none of the simulator's per-call module swapping, which
    dominates the simulated run time of the decoders.
    """
    if SIMULATOR:
        return fn
    return cuda.jit(device=True, forceinline=True)(fn)


# exp(80) is finite in float32; below -80, silu(g) is 0 to float32 precision
_EXP_CLAMP = float32(80)


@device_inline
def silu(g):
    """``g * sigmoid(g)`` in float32, without overflow for large ``-g``."""
    return g / (float32(1) + math.exp(min(-g, _EXP_CLAMP)))


def kernel(**options):
    """``@cuda.jit(**options)`` on a GPU; options the simulator does not know
    (``launch_bounds``, ``max_registers``) are dropped there."""
    if SIMULATOR:
        return cuda.jit
    return cuda.jit(**options)


if not SIMULATOR:
    from numba.cuda.extending import intrinsic
    from numba.cuda import cgutils

    def _item_ptr(context, builder, sig, args, a, k):
        """LLVM pointer to ``arr[i]`` for intrinsic argument ``a`` (the array)
        and ``k`` (the index); no wraparound, no bounds check."""
        aryty = sig.args[a]
        ary = context.make_array(aryty)(context, builder, args[a])
        index = context.cast(builder, args[k], sig.args[k], types.intp)
        return cgutils.get_item_pointer(context, builder, aryty, ary, [index], wraparound=False)

    def _vector_load(width):
        """An intrinsic ``(arr, i) -> UniTuple(dtype, width)``: one
        ``ld.global.nc.v{width}`` of ``arr[i : i + width]`` (32-bit dtypes).

        The caller guarantees ``4 * width``-byte alignment of ``&arr[i]`` and
        that nothing writes ``arr`` during the kernel (non-coherent path).
        """

        @intrinsic
        def _load(typingctx, arr, idx):
            ety = arr.dtype
            if ety.bitwidth != 32 or not isinstance(arr, types.Array):
                return None
            sig = types.UniTuple(ety, width)(arr, idx)

            def codegen(context, builder, sig, args):
                ptr = _item_ptr(context, builder, sig, args, 0, 1)
                lty = context.get_value_type(ety)
                fnty = ir.FunctionType(ir.LiteralStructType([lty] * width), [ptr.type])
                c = "f" if isinstance(ety, types.Float) else "r"
                kind = "f32" if c == "f" else "u32"
                regs = ", ".join(f"${k}" for k in range(width))
                asm = ir.InlineAsm(fnty, f"ld.global.nc.v{width}.{kind} {{{regs}}}, [${width}];",
                                   ",".join([f"={c}"] * width) + ",l")
                res = builder.call(asm, [ptr])
                vals = [builder.extract_value(res, k) for k in range(width)]
                return context.make_tuple(builder, sig.return_type, vals)

            return sig, codegen

        return _load

    load4 = _vector_load(4)
    load2 = _vector_load(2)

    @intrinsic
    def load1(typingctx, arr, idx):
        """``arr[i]`` (32-bit dtype) by one ``ld.global.nc``, without the
        negative-index wraparound of plain indexing (a sign shift, a mask and a
        64-bit add a load in the weight-word streams of :mod:`.hmma`).  The
        caller guarantees ``0 <= i < arr.size`` and no writes to ``arr``
        during the kernel."""
        ety = arr.dtype
        if ety.bitwidth != 32 or not isinstance(arr, types.Array):
            return None
        sig = ety(arr, idx)

        def codegen(context, builder, sig, args):
            ptr = _item_ptr(context, builder, sig, args, 0, 1)
            kind, c = ("f32", "f") if isinstance(ety, types.Float) else ("u32", "r")
            fnty = ir.FunctionType(context.get_value_type(ety), [ptr.type])
            asm = ir.InlineAsm(fnty, f"ld.global.nc.{kind} $0, [$1];", f"={c},l")
            return builder.call(asm, [ptr])

        return sig, codegen

    @intrinsic
    def store4(typingctx, arr, idx, v0, v1, v2, v3):
        """``arr[i : i + 4] = v0, v1, v2, v3`` of a uint32 global array in one
        ``st.global.v4`` (``&arr[i]`` 16-byte aligned): a warp's 16-byte
        stores fill whole sectors."""
        if not isinstance(arr, types.Array) or arr.dtype != types.uint32:
            return None
        sig = types.void(arr, idx, types.uint32, types.uint32, types.uint32, types.uint32)

        def codegen(context, builder, sig, args):
            ptr = _item_ptr(context, builder, sig, args, 0, 1)
            lty = context.get_value_type(types.uint32)
            fnty = ir.FunctionType(ir.VoidType(), [ptr.type] + [lty] * 4)
            asm = ir.InlineAsm(fnty, "st.global.v4.u32 [$0], {$1, $2, $3, $4};",
                               "l,r,r,r,r,~{memory}", side_effect=True)
            builder.call(asm, [ptr] + list(args[2:]))
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def shared_load4(typingctx, arr, idx):
        """``(arr[i], arr[i+1], arr[i+2], arr[i+3])`` of a float32 or uint32
        shared array in one ``ld.shared.v4`` (``&arr[i]`` 16-byte aligned).

        A plain LLVM load through a shared-space pointer, not inline PTX:
        constant parts of ``i`` fold into the instruction's offset (inline
        PTX took a register address: one 64-bit add a load), and LLVM never
        moves a load across ``syncthreads`` or the ``cp.async`` waits (both
        touch memory).
        """
        if not isinstance(arr, types.Array) or arr.dtype not in (types.float32, types.uint32):
            return None
        ety = arr.dtype
        sig = types.UniTuple(ety, 4)(arr, idx)

        def codegen(context, builder, sig, args):
            ptr = _item_ptr(context, builder, sig, args, 0, 1)
            vty = ir.VectorType(context.get_value_type(ety), 4)
            sptr = builder.addrspacecast(ptr, ir.PointerType(ptr.type.pointee, addrspace=3))
            vec = builder.load(builder.bitcast(sptr, ir.PointerType(vty, addrspace=3)), align=16)
            vals = [builder.extract_element(vec, ir.IntType(32)(k)) for k in range(4)]
            return context.make_tuple(builder, sig.return_type, vals)

        return sig, codegen

    @intrinsic
    def as_f32(typingctx, u):
        """The float32 whose bits are the low 32 bits of the integer ``u``
        (a register move; numba widens integer arithmetic to 64 bits)."""
        if not isinstance(u, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            v = args[0]
            if v.type.width > 32:
                v = builder.trunc(v, ir.IntType(32))
            return builder.bitcast(v, ir.FloatType())

        return types.float32(u), codegen

    @intrinsic
    def f32_bits(typingctx, v):
        """The bits of the float32 ``v`` as an int32 (a register move)."""
        if not isinstance(v, types.Float):
            return None

        def codegen(context, builder, sig, args):
            x = context.cast(builder, args[0], sig.args[0], types.float32)
            return builder.bitcast(x, ir.IntType(32))

        return types.int32(v), codegen

    @intrinsic
    def half2_f32(typingctx, u):
        """``(lo, hi)``: the two fp16 halves of the 32-bit word ``u`` as float32."""
        if not isinstance(u, types.Integer):
            return None
        sig = types.UniTuple(types.float32, 2)(u)

        def codegen(context, builder, sig, args):
            v = args[0]
            if v.type.width > 32:
                v = builder.trunc(v, ir.IntType(32))
            elif v.type.width < 32:
                v = builder.zext(v, ir.IntType(32))
            f32 = ir.FloatType()
            fnty = ir.FunctionType(ir.LiteralStructType([f32] * 2), [ir.IntType(32)])
            asm = ir.InlineAsm(fnty, "{ .reg .b16 %hl, %hh; mov.b32 {%hl, %hh}, $2; "
                               "cvt.f32.f16 $0, %hl; cvt.f32.f16 $1, %hh; }", "=f,=f,r")
            res = builder.call(asm, [v])
            vals = [builder.extract_value(res, k) for k in range(2)]
            return context.make_tuple(builder, sig.return_type, vals)

        return sig, codegen

    def _as_i32(builder, v):
        if v.type.width > 32:
            return builder.trunc(v, ir.IntType(32))
        if v.type.width < 32:
            return builder.zext(v, ir.IntType(32))
        return v

    def _asm3(asm: str, restype):
        """An intrinsic ``(a, b, c) -> restype``: the one PTX instruction ``asm``
        over three 32-bit integer registers (wider arguments are truncated to
        their low 32 bits)."""

        @intrinsic
        def _op(typingctx, a, b, c):
            if not all(isinstance(t, types.Integer) for t in (a, b, c)):
                return None

            def codegen(context, builder, sig, args):
                i32 = ir.IntType(32)
                fnty = ir.FunctionType(i32, [i32] * 3)
                op = ir.InlineAsm(fnty, asm, "=r,r,r,r")
                return builder.call(op, [_as_i32(builder, v) for v in args])

            return restype(a, b, c), codegen

        return _op

    # ``c + sum(a.byte[i] * b.byte[i])`` over the four signed bytes of the
    # words ``a`` and ``b``, as int32
    dp4a = _asm3("dp4a.s32.s32 $0, $1, $2, $3;", types.int32)
    # ``a * b + c`` on the two fp16 halves of the words, one rounding; a uint32 word
    hfma2 = _asm3("fma.rn.f16x2 $0, $1, $2, $3;", types.uint32)
    # byte ``k`` of the result: byte ``(c >> 4k) & 15`` of the eight bytes of
    # ``a`` (0..3) then ``b`` (4..7); a uint32 word (selector nibbles 0..7
    # only: the sign-replicating 8..15 have no simulator twin)
    prmt = _asm3("prmt.b32 $0, $1, $2, $3;", types.uint32)

    def _mma_asm(k: int, n_a: int, n_b: int, fp16: bool):
        """``codegen`` of ``mma.sync.aligned.m16n8k{k}``: ``n_a`` A words, ``n_b``
        B words and 4 accumulators in, 4 out; signed bytes with int32
        accumulators, or (``fp16``) fp16 words with float32 accumulators."""
        regs = [f"${r}" for r in range(4 + n_a + n_b + 4)]
        groups = [regs[:4], regs[4:4 + n_a], regs[4 + n_a:4 + n_a + n_b], regs[4 + n_a + n_b:]]
        kind = "f32.f16.f16.f32" if fp16 else "s32.s8.s8.s32"
        text = (f"mma.sync.aligned.m16n8k{k}.row.col.{kind} "
                + ", ".join("{" + ", ".join(g) + "}" for g in groups) + ";")
        acc = "f" if fp16 else "r"
        n_w = n_a + n_b
        constraints = ",".join([f"={acc}"] * 4 + ["r"] * n_w + [acc] * 4)

        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            aty = ir.FloatType() if fp16 else i32
            fnty = ir.FunctionType(ir.LiteralStructType([aty] * 4), [i32] * n_w + [aty] * 4)
            words = [_as_i32(builder, v) for v in args[:n_w]]
            if fp16:
                accs = [context.cast(builder, v, t, types.float32)
                        for v, t in zip(args[n_w:], sig.args[n_w:])]
            else:
                accs = [_as_i32(builder, v) for v in args[n_w:]]
            res = builder.call(ir.InlineAsm(fnty, text, constraints), words + accs)
            vals = [builder.extract_value(res, r) for r in range(4)]
            return context.make_tuple(builder, sig.return_type, vals)

        return codegen

    _MMA_K32 = _mma_asm(32, 4, 2, False)

    def _int_words_sig(args):
        if not all(isinstance(t, types.Integer) for t in args):
            return None
        return types.UniTuple(types.int32, 4)(*args)

    @intrinsic
    def mma_s8_k32(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """One warp-wide ``mma.sync.m16n8k32`` on signed bytes, int32 accumulate.

        ``D (16x8) = A (16x32) @ B (32x8) + C``.  Lane ``l`` (group ``g = l >> 2``,
        ``i = l & 3``) holds ``A[g, 4i:4i+4]`` (``a0``), ``A[g+8, 4i:4i+4]``
        (``a1``), ``A[g, 16+4i:20+4i]`` (``a2``), ``A[g+8, 16+4i:20+4i]``
        (``a3``), ``B[4i:4i+4, g]`` (``b0``), ``B[16+4i:20+4i, g]`` (``b1``), and
        ``C``/``D`` elements ``[g, 2i]``, ``[g, 2i+1]``, ``[g+8, 2i]``,
        ``[g+8, 2i+1]``.  Every lane of the warp must execute it.
        """
        sig = _int_words_sig((a0, a1, a2, a3, b0, b1, c0, c1, c2, c3))
        return None if sig is None else (sig, _MMA_K32)

    _HMMA_K16 = _mma_asm(16, 4, 2, True)
    _HMMA_K8 = _mma_asm(8, 2, 1, True)

    def _f16_mma_sig(words, accs):
        if not all(isinstance(t, types.Integer) for t in words):
            return None
        if not all(isinstance(t, (types.Float, types.Integer)) for t in accs):
            return None
        return types.UniTuple(types.float32, 4)(*words, *accs)

    @intrinsic
    def mma_f16(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """One warp-wide ``mma.sync.m16n8k16`` on fp16, float32 accumulate.

        ``D (16x8) = A (16x16) @ B (16x8) + C``; words hold two fp16 values,
        the lower column (or k) in the low half.  Lane ``(g, i)`` (``g = l >> 2``,
        ``i = l & 3``) holds ``A[g, 2i:2i+2]`` (``a0``), ``A[g+8, 2i:2i+2]``
        (``a1``), ``A[g, 2i+8:2i+10]`` (``a2``), ``A[g+8, 2i+8:2i+10]``
        (``a3``), ``B[2i:2i+2, g]`` (``b0``), ``B[2i+8:2i+10, g]`` (``b1``) and
        ``C``/``D`` ``[g, 2i]``, ``[g, 2i+1]``, ``[g+8, 2i]``, ``[g+8, 2i+1]``.
        Every lane of the warp must execute it.
        """
        sig = _f16_mma_sig((a0, a1, a2, a3, b0, b1), (c0, c1, c2, c3))
        return None if sig is None else (sig, _HMMA_K16)

    @intrinsic
    def mma_f16_k8(typingctx, a0, a1, b0, c0, c1, c2, c3):
        """As :func:`mma_f16` with ``mma.sync.m16n8k8``: ``A`` 16x8 (``a0``, ``a1``
        as there), ``B`` 8x8 (``b0``)."""
        sig = _f16_mma_sig((a0, a1, b0), (c0, c1, c2, c3))
        return None if sig is None else (sig, _HMMA_K8)

    @intrinsic
    def pack_half2(typingctx, lo, hi):
        """The 32-bit word of fp16 ``(lo, hi)``, each float32 rounded to nearest
        (``cvt.rn.f16x2.f32``)."""
        if not all(isinstance(t, types.Float) for t in (lo, hi)):
            return None

        def codegen(context, builder, sig, args):
            f32 = ir.FloatType()
            vals = [context.cast(builder, v, t, types.float32) for v, t in zip(args, sig.args)]
            fnty = ir.FunctionType(ir.IntType(32), [f32, f32])
            asm = ir.InlineAsm(fnty, "cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f")
            return builder.call(asm, [vals[1], vals[0]])

        return types.uint32(lo, hi), codegen

    @intrinsic
    def cp_async16(typingctx, dst, didx, src, sidx):
        """Start copying the 16 bytes at ``src[sidx]`` (global) to ``dst[didx]``
        (shared), both 16-byte aligned, without registers (``cp.async.cg``);
        :func:`cp_async_commit` closes a group, :func:`cp_async_wait1` waits
        for all groups but the newest (the caller then syncs the block)."""
        if not (isinstance(dst, types.Array) and isinstance(src, types.Array)):
            return None
        sig = types.void(dst, didx, src, sidx)

        def codegen(context, builder, sig, args):
            ptrs = [_item_ptr(context, builder, sig, args, a, k) for a, k in ((0, 1), (2, 3))]
            fnty = ir.FunctionType(ir.VoidType(), [p.type for p in ptrs])
            asm = ir.InlineAsm(fnty, "{ .reg .u64 %sd; cvta.to.shared.u64 %sd, $0; "
                               "cp.async.cg.shared.global [%sd], [$1], 16; }",
                               "l,l,~{memory}", side_effect=True)
            builder.call(asm, ptrs)
            return context.get_dummy_value()

        return sig, codegen

    def _cp_async_op(text):
        @intrinsic
        def _op(typingctx):
            def codegen(context, builder, sig, args):
                fnty = ir.FunctionType(ir.VoidType(), [])
                builder.call(ir.InlineAsm(fnty, text, "~{memory}", side_effect=True), [])
                return context.get_dummy_value()

            return types.void(), codegen

        return _op

    cp_async_commit = _cp_async_op("cp.async.commit_group;")
    cp_async_wait1 = _cp_async_op("cp.async.wait_group 1;")

    @device_inline
    def seg_sum(v, width):
        """Sum of ``v`` over each aligned group of ``width`` lanes (a power of
        two <= 32); every lane of the group gets the sum."""
        off = width >> 1
        while off > 0:
            v += cuda.shfl_xor_sync(_FULL, v, off)
            off >>= 1
        return v

    @device_inline
    def pair_max(v):
        """The larger of ``v`` in lanes ``2k`` and ``2k + 1`` (NaN if either is
        NaN), in both."""
        o = cuda.shfl_xor_sync(_FULL, v, 1)
        return o if (o > v or o != o) else v

    @device_inline
    def warp_sum64(v):
        """float64 sum over the warp, in every lane."""
        for off in (16, 8, 4, 2, 1):
            v += cuda.shfl_xor_sync(_FULL, v, off)
        return v

    @device_inline
    def warp_max64(v):
        """Maximum of a float64 (NaN-free) or an int64 over the warp, in every lane."""
        for off in (16, 8, 4, 2, 1):
            o = cuda.shfl_xor_sync(_FULL, v, off)
            if o > v:
                v = o
        return v

    @device_inline
    def warp_argmax(v, i):
        """``(v, i)`` of the lane with the largest ``v``, ties to the lower
        ``i``; in every lane.  ``v`` must be NaN-free."""
        for off in (16, 8, 4, 2, 1):
            ov = cuda.shfl_xor_sync(_FULL, v, off)
            oi = cuda.shfl_xor_sync(_FULL, i, off)
            if ov > v or (ov == v and oi < i):
                v = ov
                i = oi
        return v, i

    @device_inline
    def warp_sync():
        """Order shared-memory accesses among the lanes of a warp."""
        cuda.syncwarp(_FULL)

else:
    import sys
    import threading
    import traceback

    from numba.cuda.simulator import kernelapi as _kernelapi
    from numba.np import numpy_support

    _SHARED_ARRAY = _kernelapi.FakeCUDAShared.array
    _ALLOC_LOCK = threading.Lock()

    def _shared_array(self, shape, dtype, alignment=None):
        """``cuda.shared.array`` of the simulator without its allocation race.

        numba-cuda's simulator keys a block's static shared arrays by the
        calling line and creates one on first use with an unguarded
        check-then-store, so two threads of a block reaching a line first at
        the same moment can get different arrays (seen as rare wrong results
        of the tensor-core kernel's twin under load).  Same keying, under a
        lock; dynamic shared memory (``shape == 0``) is one buffer already.
        """
        if shape == 0 or alignment is not None:
            return _SHARED_ARRAY(self, shape, dtype, alignment)
        caller = tuple(traceback.extract_stack(sys._getframe(1), limit=1)[0])[0:2]
        with _ALLOC_LOCK:
            res = self._allocations.get(caller)
            if res is None:
                if isinstance(dtype, types.Type):
                    dtype = numpy_support.as_dtype(dtype)
                res = np.empty(shape, dtype)
                self._allocations[caller] = res
        return res

    _kernelapi.FakeCUDAShared.array = _shared_array

    def load4(arr, i):
        return arr[i], arr[i + 1], arr[i + 2], arr[i + 3]

    def load2(arr, i):
        return arr[i], arr[i + 1]

    def load1(arr, i):
        return arr[i]

    def store4(arr, i, v0, v1, v2, v3):
        arr[i], arr[i + 1], arr[i + 2], arr[i + 3] = v0, v1, v2, v3

    shared_load4 = load4

    def dp4a(a, b, c):
        bytes_a = np.array([int(a) & _FULL], np.uint32).view(np.int8).astype(np.int64)
        bytes_b = np.array([int(b) & _FULL], np.uint32).view(np.int8).astype(np.int64)
        return np.int32(np.int64(c) + bytes_a @ bytes_b)

    @cuda.jit(device=True)
    def mma_s8_k32(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        regs = cuda.shared.array((_MAX_THREADS, 6), np.int64)
        tid = cuda.threadIdx.x
        for k, v in enumerate((a0, a1, a2, a3, b0, b1)):
            regs[tid, k] = int(v) & _FULL
        cuda.syncthreads()
        warp = tid - tid % 32
        g = (tid % 32) >> 2
        i = tid & 3
        words = np.array([[regs[warp + lane, k] for k in range(6)] for lane in range(32)],
                         np.int64)
        frag = words.astype(np.uint32).view(np.int8).reshape(32, 6, 4)
        a = np.zeros((16, 32), np.int64)
        b = np.zeros((32, 8), np.int64)
        for lane in range(32):
            lg, li = lane >> 2, lane & 3
            a[lg, 4 * li:4 * li + 4] = frag[lane, 0]
            a[lg + 8, 4 * li:4 * li + 4] = frag[lane, 1]
            a[lg, 16 + 4 * li:20 + 4 * li] = frag[lane, 2]
            a[lg + 8, 16 + 4 * li:20 + 4 * li] = frag[lane, 3]
            b[4 * li:4 * li + 4, lg] = frag[lane, 4]
            b[16 + 4 * li:20 + 4 * li, lg] = frag[lane, 5]
        d = a @ b
        cuda.syncthreads()
        return (np.int32(c0 + d[g, 2 * i]), np.int32(c1 + d[g, 2 * i + 1]),
                np.int32(c2 + d[g + 8, 2 * i]), np.int32(c3 + d[g + 8, 2 * i + 1]))

    def _halves(words):
        """fp16 pairs of uint32 words as float64, shape (n, 2) (low half first)."""
        w = np.array([int(v) & _FULL for v in words], np.uint32)
        return w.view(np.float16).astype(np.float64).reshape(-1, 2)

    @cuda.jit(device=True)
    def _mma_f16_twin(k, words, c0, c1, c2, c3):
        """The warp's ``D = A @ B + C`` for an fp16 ``mma`` of depth ``k`` (16 or
        8), each lane passing its A then B words, as the hardware lays them out."""
        n = len(words)
        regs = cuda.shared.array((_MAX_THREADS, 6), np.int64)
        tid = cuda.threadIdx.x
        for j, v in enumerate(words):
            regs[tid, j] = int(v) & _FULL
        cuda.syncthreads()
        warp = tid - tid % 32
        g = (tid % 32) >> 2
        i = tid & 3
        a = np.zeros((16, k))
        b = np.zeros((k, 8))
        for lane in range(32):
            h = _halves([regs[warp + lane, j] for j in range(n)])
            lg, li = lane >> 2, lane & 3
            a[lg, 2 * li:2 * li + 2] = h[0]
            a[lg + 8, 2 * li:2 * li + 2] = h[1]
            if k == 16:
                a[lg, 2 * li + 8:2 * li + 10] = h[2]
                a[lg + 8, 2 * li + 8:2 * li + 10] = h[3]
                b[2 * li:2 * li + 2, lg] = h[4]
                b[2 * li + 8:2 * li + 10, lg] = h[5]
            else:
                b[2 * li:2 * li + 2, lg] = h[2]
        d = a @ b
        cuda.syncthreads()
        return (np.float32(c0 + d[g, 2 * i]), np.float32(c1 + d[g, 2 * i + 1]),
                np.float32(c2 + d[g + 8, 2 * i]), np.float32(c3 + d[g + 8, 2 * i + 1]))

    @cuda.jit(device=True)
    def mma_f16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return _mma_f16_twin(16, (a0, a1, a2, a3, b0, b1), c0, c1, c2, c3)

    @cuda.jit(device=True)
    def mma_f16_k8(a0, a1, b0, c0, c1, c2, c3):
        return _mma_f16_twin(8, (a0, a1, b0), c0, c1, c2, c3)

    def hfma2(a, b, c):
        r = _halves((a,))[0] * _halves((b,))[0] + _halves((c,))[0]
        return np.uint32(r.astype(np.float16).view(np.uint32)[0])

    def prmt(a, b, c):
        src = np.array([int(a) & _FULL, int(b) & _FULL], np.uint32).view(np.uint8)
        sel = int(c)
        out = [src[(sel >> (4 * k)) & 7] for k in range(4)]
        return np.array(out, np.uint8).view(np.uint32)[0]

    def pack_half2(lo, hi):
        return np.uint32(np.array([lo, hi], np.float16).view(np.uint32)[0])

    def cp_async16(dst, didx, src, sidx):
        for k in range(4):
            dst[didx + k] = src[sidx + k]

    def cp_async_commit():
        pass

    cp_async_wait1 = cp_async_commit

    def as_f32(u):
        return np.uint32(u).view(np.float32)

    def f32_bits(v):
        return int(np.float32(v).view(np.int32))

    def half2_f32(u):
        lo, hi = np.array([u], np.uint32).view(np.float16)
        return np.float32(lo), np.float32(hi)

    @cuda.jit(device=True)
    def _block_values(v, dtype):
        """Every thread's ``v`` (a copy, indexed by thread), exchanged through
        shared memory between two barriers: the simulator's shuffle."""
        # one allocation line per dtype: the simulator keys static shared arrays by line
        if dtype == float64:
            buf = cuda.shared.array(_MAX_THREADS, float64)
        elif dtype == int64:
            buf = cuda.shared.array(_MAX_THREADS, int64)
        elif dtype == int32:
            buf = cuda.shared.array(_MAX_THREADS, int32)
        else:
            buf = cuda.shared.array(_MAX_THREADS, float32)
        buf[cuda.threadIdx.x] = v
        cuda.syncthreads()
        vals = buf.copy()
        cuda.syncthreads()
        return vals

    @cuda.jit(device=True)
    def seg_sum(v, width):
        vals = _block_values(v, float32)
        tid = cuda.threadIdx.x
        base = tid - tid % width
        s = float32(0)
        for k in range(width):
            s += vals[base + k]
        return s

    @cuda.jit(device=True)
    def pair_max(v):
        o = _block_values(v, float32)[cuda.threadIdx.x ^ 1]
        return o if (o > v or o != o) else v

    @cuda.jit(device=True)
    def warp_sum64(v):
        vals = _block_values(v, float64)
        base = cuda.threadIdx.x // 32 * 32
        s = float64(0)
        for k in range(32):
            s += vals[base + k]
        return s

    @cuda.jit(device=True)
    def warp_max64(v):
        vals = _block_values(v, float64 if isinstance(v, float) else int64)
        base = cuda.threadIdx.x // 32 * 32
        m = vals[base]
        for k in range(1, 32):
            if vals[base + k] > m:
                m = vals[base + k]
        return m

    @cuda.jit(device=True)
    def warp_argmax(v, i):
        vs = _block_values(v, float32)
        idx = _block_values(i, int32)
        base = cuda.threadIdx.x // 32 * 32
        bv = vs[base]
        bi = idx[base]
        for k in range(1, 32):
            ov = vs[base + k]
            oi = idx[base + k]
            if ov > bv or (ov == bv and oi < bi):
                bv = ov
                bi = oi
        return bv, bi

    @cuda.jit(device=True)
    def warp_sync():
        cuda.syncthreads()


if not SIMULATOR:

    @cuda.jit(device=True)
    def block_exclusive_scan(buf, n, tmp):
        """In-place exclusive prefix sum of ``buf[0:n]`` by the whole block;
        returns the sum of the ``n`` values (in every thread).

        ``tmp`` is shared scratch of ``blockDim.x`` entries (not ``buf``), of
        ``buf``'s dtype.  In chunks of the block size: shuffle scans within
        warps, then over the warp totals (three barriers a chunk).
        """
        nt = cuda.blockDim.x
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        nw = nt >> 5
        carry = 0
        for base in range(0, n, nt):
            i = base + tid
            own = buf[i] if i < n else 0
            v = own
            for d in (1, 2, 4, 8, 16):
                o = cuda.shfl_up_sync(_FULL, v, d)
                if lane >= d:
                    v += o
            if lane == 31:
                tmp[warp] = v
            cuda.syncthreads()
            if warp == 0:
                t = tmp[lane] if lane < nw else 0
                for d in (1, 2, 4, 8, 16):
                    o = cuda.shfl_up_sync(_FULL, t, d)
                    if lane >= d:
                        t += o
                if lane < nw:
                    tmp[lane] = t
            cuda.syncthreads()
            if i < n:
                buf[i] = carry + (tmp[warp - 1] if warp > 0 else 0) + v - own
            carry += tmp[nw - 1]
            cuda.syncthreads()
        return carry

else:

    @cuda.jit(device=True)
    def block_exclusive_scan(buf, n, tmp):
        nt = cuda.blockDim.x
        tid = cuda.threadIdx.x
        carry = 0
        for base in range(0, n, nt):
            i = base + tid
            own = buf[i] if i < n else 0
            v = own
            tmp[tid] = v
            off = 1
            while off < nt:
                cuda.syncthreads()
                add = tmp[tid - off] if tid >= off else 0
                cuda.syncthreads()
                v += add
                tmp[tid] = v
                off <<= 1
            cuda.syncthreads()
            if i < n:
                buf[i] = carry + v - own
            carry += tmp[nt - 1]
            cuda.syncthreads()
        return carry


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``n`` (``n`` >= 1)."""
    return 1 << max(0, math.ceil(math.log2(n)))

"""Top-k routing on the device: router logits -> (expert ids, weights).

Same semantics as :func:`numba_moe.route` (SPEC section 5), computed the
same way: exponentials and sums in float64, each probability rounded to
float32 once, NaN selection scores compare as ``-inf``, ties go to the lower
expert index, and every id is valid even when all scores are ``-inf``/NaN.

One warp routes one token.  Its exponentials, probabilities and selection
scores live in shared memory (``4 * E + n_group`` words a warp,
:func:`warp_words`), so any E fits that the shared memory does; K <= 32
because lane k keeps the k-th pick.  The selection keys of up to
``32 * REG_KEYS_MAX`` experts stay in registers (one kernel per keys a
lane, :func:`topk_kernel`); more go to shared memory, where the
exponentials were.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, float64, int32, int64

from ..errors import MoEError
from ..routing import GATINGS, RouterOutput, _check_params, group_score
from .primitives import f32_bits, warp_argmax, warp_max64, warp_sum64, warp_sync

__all__ = ["topk_route", "launch_topk", "topk_kernel", "warp_words", "block_warps",
           "check_experts", "MAX_TOP_K", "REG_KEYS_MAX"]

#: Largest K the device router supports (one lane per pick).
MAX_TOP_K = 32
#: Most selection keys a lane holds in registers (experts up to 32 times it).
REG_KEYS_MAX = 8
_SOFTMAX = GATINGS["softmax"]
_SIGMOID = GATINGS["sigmoid"]
_SOFTMAX_WEIGHT = GATINGS["softmax_weight"]
_NEG_INF = float32(-np.inf)


# the selection key of an expert already picked: below every score's key
_PICKED = int64(-(2**63))
# dynamic shared memory a block may use without opting in to more
_SHARED_LIMIT = 48 << 10
# routing kernels by selection keys a lane (0: keys in shared memory)
_kernels = {}
# the CPU router's group score, as a device function
_group_score = cuda.jit(device=True)(group_score)


def warp_words(n_exp: int, n_group: int) -> int:
    """float32 words of one warp's shared scratch in the routing kernel (even:
    its first half holds 8-byte words)."""
    n = 4 * n_exp + n_group
    return n + (n & 1)


def block_warps(n_exp: int, n_group: int, warps: int) -> int:
    """Tokens (warps) a block of the routing kernel takes: ``warps``, fewer
    when their scratch would pass 48 KiB of shared memory (at least one; see
    :func:`check_experts`)."""
    return max(1, min(warps, _SHARED_LIMIT // (4 * warp_words(n_exp, n_group))))


def check_experts(n_exp: int, n_group: int) -> None:
    """Raise :class:`~numba_moe.errors.MoEError` when one token's routing
    scratch does not fit 48 KiB of shared memory (above about 3000 experts)."""
    need = 4 * warp_words(n_exp, n_group)
    if need > _SHARED_LIMIT:
        raise MoEError(f"{n_exp} experts: the CUDA routing kernel needs {need} bytes of "
                       f"shared memory a token, more than {_SHARED_LIMIT}")


@cuda.jit(device=True)
def _select_key(v, e):
    """Expert ``e`` with selection score ``v`` (NaN-free: the scores hold NaN
    as ``-inf``) as one int64 that orders as the CPU's pick order: higher
    score first, ties to the lower id (-0 taken as 0, which compares equal).

    High half: the float's bits made to order as signed integers (negative
    floats have their magnitude bits flipped); low half: ``2**32 - 1 - e``.
    """
    if v == 0:
        v = float32(0)
    b = int64(f32_bits(v))
    if b < 0:
        b ^= 0x7FFFFFFF
    return (b << 32) | (0xFFFFFFFF - int64(e))


@cuda.jit(device=True)
def _select_in_shared(sh, skey, wide, sel, lane, n_exp, top_k):
    """Pick ``lane`` (``lane < top_k``) of the ``top_k`` largest selection
    keys of ``sh[sel : sel + n_exp]``, for any number of experts: the keys
    in ``skey[wide : wide + n_exp]``, a lane keeps the largest of its
    unpicked ones, so a pick is one warp maximum and a rescan by the lane
    that owned the winner."""
    best = _PICKED
    for e in range(lane, n_exp, 32):
        k = _select_key(sh[sel + e], e)
        skey[wide + e] = k
        best = max(best, k)
    my_id = int32(0)
    for k in range(top_k):
        won = int32(0xFFFFFFFF - (warp_max64(best) & 0xFFFFFFFF))
        if lane == k:
            my_id = won
        if (won & 31) == lane:
            skey[wide + won] = _PICKED
            best = _PICKED
            for e in range(lane, n_exp, 32):
                best = max(best, skey[wide + e])
    return my_id


def _select_in_registers(nv: int):
    """:func:`_select_in_shared` for ``32 * nv`` experts at most, each lane's
    ``nv`` keys in registers, sorted once: a pick is one warp maximum of the
    lanes' first keys, and the winner shifts its list, with no shared-memory
    rescan (H100, Qwen3-30B-A3B layer, T=1: the eight rounds were 70 % of
    the kernel's instructions, about 230 each, now 52; route phase 6.2 ->
    4.85 us)."""

    @cuda.jit(device=True)
    def select(sh, skey, wide, sel, lane, n_exp, top_k):
        ks = cuda.local.array(nv, int64)
        for j in range(nv):
            ks[j] = _PICKED
        for i in range(nv):
            e = lane + 32 * i
            if e < n_exp:
                k = _select_key(sh[sel + e], e)
                # insertion into the descending list
                for j in range(nv):
                    if k > ks[j]:
                        t = ks[j]
                        ks[j] = k
                        k = t
        my_id = int32(0)
        for r in range(top_k):
            m = warp_max64(ks[0])
            if lane == r:
                my_id = int32(0xFFFFFFFF - (m & 0xFFFFFFFF))
            # keys are distinct: only the owner of the winner matches
            if ks[0] == m:
                for j in range(nv - 1):
                    ks[j] = ks[j + 1]
                ks[nv - 1] = _PICKED
        return my_id

    return select


def _make_route_token(nv: int):
    """The per-token routing function for ``32 * nv`` experts at most (``nv``
    = 0: any number, the selection keys in shared memory)."""
    select = _select_in_registers(nv) if nv else _select_in_shared

    @cuda.jit(device=True)
    def route_token(logits, row, lane, sh, sh64, skey, base, n_exp, top_k, gating, norm, bias,
                    has_bias, n_group, topk_group, scale):
        """Route the token whose logits start at ``logits[row]``, by one warp.

        ``sh[base : base + warp_words(n_exp, n_group)]`` is this warp's shared
        scratch (``base`` even), ``sh64`` and ``skey`` the same memory as
        float64 and int64: the exponentials of the softmax (then, for many
        experts, the selection keys of :func:`_select_key`) in its first ``2 *
        n_exp`` words, the probabilities, the selection scores and the group
        scores after them.  Returns ``(id, weight)`` of pick ``lane``
        (meaningful for ``lane < top_k``).  Every lane of the warp must call it
        (warp reductions), and the caller syncs the warp before reusing the
        scratch.

        Lane ``l`` owns experts ``l, l + 32, ...`` (a loop of ``nv`` steps,
        unrolled, when ``nv`` is set).
        """
        per_lane = nv if nv else (n_exp + 31) >> 5
        wide = base >> 1
        probs = base + 2 * n_exp
        sel = base + 3 * n_exp
        gsc = base + 4 * n_exp

        s = float64(1)
        if gating == _SOFTMAX:
            m = _NEG_INF
            for i in range(per_lane):
                e = lane + 32 * i
                if e < n_exp:
                    v = logits[row + e]
                    if v > m:
                        m = v
            m64 = warp_max64(float64(m))
            s = float64(0)
            for i in range(per_lane):
                e = lane + 32 * i
                if e < n_exp:
                    ex = math.exp(float64(logits[row + e]) - m64)
                    sh64[wide + e] = ex
                    s += ex
            s = warp_sum64(s)
        for i in range(per_lane):
            e = lane + 32 * i
            if e < n_exp:
                if gating == _SOFTMAX:
                    p = float32(sh64[wide + e] / s)
                elif gating == _SIGMOID:
                    p = float32(1.0 / (1.0 + math.exp(-float64(logits[row + e]))))
                else:
                    p = logits[row + e]
                sh[probs + e] = p
                v = p + bias[e] if has_bias else p
                sh[sel + e] = v if v == v else _NEG_INF
        warp_sync()
        if n_group > 1:
            gsize = n_exp // n_group
            for g in range(lane, n_group, 32):
                sh[gsc + g] = _group_score(sh, sel, g, gsize)
            warp_sync()
            for _ in range(topk_group):
                bv = _NEG_INF
                bi = int32(n_group)
                for g in range(lane, n_group, 32):
                    v = sh[gsc + g]
                    # NaN marks a group already kept
                    if v == v and (bi == n_group or v > bv):
                        bv = v
                        bi = int32(g)
                bv, bi = warp_argmax(bv, bi)
                if lane == 0:
                    sh[gsc + bi] = np.nan
                warp_sync()
            for i in range(per_lane):
                e = lane + 32 * i
                if e < n_exp:
                    v = sh[gsc + e // gsize]
                    if v == v:
                        sh[sel + e] = _NEG_INF
            warp_sync()

        my_id = select(sh, skey, wide, sel, lane, n_exp, top_k)

        mine = lane < top_k
        if gating == _SOFTMAX_WEIGHT:
            xk = logits[row + my_id]
            mk = float64(xk) if (mine and xk > _NEG_INF) else float64(-np.inf)
            mk = warp_max64(mk)
            ek = math.exp(float64(xk) - mk) if mine else float64(0)
            s = warp_sum64(ek)
            w = float32(ek / s * scale)
        else:
            pk = float64(sh[probs + my_id]) if mine else float64(0)
            s = float64(1)
            if norm:
                s = warp_sum64(pk)
            if norm and s <= 0.0:
                w = float32(scale / top_k)
            else:
                w = float32(pk / s * scale)
        return my_id, w

    return route_token


@cuda.jit(device=True)
def _add_planes(logits, row, lane, lstride, parts, part_stride):
    """Add planes ``1 .. parts - 1`` of a row's columns into plane 0, in
    plane order, by one warp.

    The planes are partial sums still in L2, so the time is load latency: a
    lane takes four columns 32 apart and eight planes a round, 32 loads in
    flight instead of one.  Columns past the row read its last one and
    store nothing.
    """
    last = row + lstride - 1
    for c in range(row + lane, row + lstride, 128):
        i1 = min(c + 32, last)
        i2 = min(c + 64, last)
        i3 = min(c + 96, last)
        v0 = logits[c]
        v1 = logits[i1]
        v2 = logits[i2]
        v3 = logits[i3]
        z = 1
        while z < parts:
            n = min(parts - z, 8)
            a = cuda.local.array((8, 4), float32)
            for j in range(8):
                if j < n:
                    o = int64(z + j) * part_stride
                    a[j, 0] = logits[o + c]
                    a[j, 1] = logits[o + i1]
                    a[j, 2] = logits[o + i2]
                    a[j, 3] = logits[o + i3]
            for j in range(8):
                if j < n:
                    v0 += a[j, 0]
                    v1 += a[j, 1]
                    v2 += a[j, 2]
                    v3 += a[j, 3]
            z += n
        logits[c] = v0
        if c + 32 <= last:
            logits[i1] = v1
        if c + 64 <= last:
            logits[i2] = v2
        if c + 96 <= last:
            logits[i3] = v3


def topk_kernel(n_exp: int):
    """The routing kernel for ``n_exp`` experts: selection keys in registers
    up to :data:`REG_KEYS_MAX` a lane, else in shared memory."""
    nv = -(-n_exp // 32)
    nv = nv if nv <= REG_KEYS_MAX else 0
    if nv not in _kernels:
        _kernels[nv] = _make_topk_kernel(nv)
    return _kernels[nv]


def _make_topk_kernel(nv: int):
    route_token = _make_route_token(nv)

    @cuda.jit
    def kernel(logits, lstride, n_tok, n_exp, top_k, gating, norm, bias, has_bias,
               n_group, topk_group, scale, ids, weights, parts, part_stride, words):
        """Warp ``w`` of block ``b`` routes token ``b * warps + w``.

        Dynamic shared memory: ``warps * words`` float32 (``words`` =
        :func:`warp_words` of ``n_exp``, ``n_group``).
        Warps past the last token route the last token again and write nothing,
        so every lane reaches every reduction.  With ``parts > 1`` the logits
        come as that many partial planes ``part_stride`` apart: the token's warp
        first adds them, in order, into the first.
        """
        sh = cuda.shared.array(0, float32)
        sh64 = cuda.shared.array(0, float64)
        skey = cuda.shared.array(0, int64)
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        t = cuda.blockIdx.x * (cuda.blockDim.x >> 5) + warp
        valid = t < n_tok
        row = (t if valid else n_tok - 1) * lstride
        if parts > 1:
            if valid:
                _add_planes(logits, row, lane, lstride, parts, part_stride)
            # the lanes read each other's sums (syncwarp orders global memory too)
            warp_sync()
        my_id, w = route_token(logits, row, lane, sh, sh64, skey, warp * words, n_exp, top_k,
                               gating, norm, bias, has_bias, n_group, topk_group, scale)
        if valid and lane < top_k:
            ids[t * top_k + lane] = my_id
            weights[t * top_k + lane] = w

    return kernel


def launch_topk(logits, lstride, n_tok, n_exp, params, bias_dev, ids, weights, warps, stream,
                parts=1):
    """Launch the routing kernel on device buffers (no checks, no allocation).

    Parameters
    ----------
    logits : device float32, flat ``[parts * n_tok * lstride]``
        Row t's logits at ``t * lstride .. t * lstride + n_exp``; with
        ``parts > 1``, the sum of that many planes of ``n_tok * lstride``
        (partial sums over the router's columns): the kernel adds them into
        the first plane, all ``lstride`` columns of each row.
    params : tuple
        ``numba_moe.routing._check_params`` output.
    bias_dev : device float32 [E] (or [1] when there is no bias)
    ids, weights : device int32 / float32, flat ``[n_tok * K]``
    warps : int
        Tokens per block (fewer for many experts: :func:`block_warps`).
    """
    top_k, norm, gating, bias, n_group, topk_group, scale = params
    warps = block_warps(n_exp, n_group, warps)
    words = warp_words(n_exp, n_group)
    grid = -(-n_tok // warps)
    topk_kernel(n_exp)[grid, 32 * warps, stream, warps * words * 4](
        logits, lstride, n_tok, n_exp, top_k, gating, norm, bias_dev, bias.shape[0] > 0,
        n_group, topk_group, scale, ids, weights, parts, n_tok * lstride, words)


def topk_route(logits, top_k, norm_topk_prob=True, gating="softmax", selection_bias=None,
               n_group=1, topk_group=1, scale=1.0, stream=0, out=None) -> RouterOutput:
    """:func:`numba_moe.route` on the GPU.

    Parameters
    ----------
    logits : float32 (T, E), numpy or any ``__cuda_array_interface__`` array
        C-contiguous.
    top_k, norm_topk_prob, gating, selection_bias, n_group, topk_group, scale
        As :func:`numba_moe.route`; ``top_k <= 32``.
    stream : numba stream, optional
    out : (ids, weights) device arrays, optional
        int32 / float32 (T, K) destinations (else allocated).

    Returns
    -------
    RouterOutput
        Device arrays: ``expert_ids`` int32 (T, K), ``expert_weights`` float32 (T, K).

    Raises
    ------
    MoEError
        Bad dtype, shape or layout of ``logits``, an option out of range, or
        more experts than one token's scratch fits (:func:`check_experts`).
    """
    from ..config import CUDA_LAUNCH
    from .arrays import as_device_2d, check_out

    d_logits = as_device_2d("logits", logits, np.float32, stream)
    n_tok, n_exp = d_logits.shape
    params = _check_params(n_exp, top_k, norm_topk_prob, gating, selection_bias,
                           n_group, topk_group, scale)
    if params[0] > MAX_TOP_K:
        raise MoEError(f"top_k must be <= {MAX_TOP_K} on the CUDA path, got {params[0]}")
    check_experts(n_exp, params[4])
    bias = params[3]
    bias_dev = cuda.to_device(bias if bias.shape[0] else np.zeros(1, np.float32), stream=stream)
    shape = (n_tok, params[0])
    if out is None:
        ids = cuda.device_array(shape, np.int32, stream=stream)
        weights = cuda.device_array(shape, np.float32, stream=stream)
    else:
        ids = check_out("out[0]", out[0], np.int32, shape)
        weights = check_out("out[1]", out[1], np.float32, shape)
    if n_tok:
        launch_topk(d_logits.reshape(n_tok * n_exp), n_exp, n_tok, n_exp, params, bias_dev,
                    ids.reshape(ids.size), weights.reshape(weights.size),
                    CUDA_LAUNCH.topk_warps, stream)
    return RouterOutput(ids, weights)

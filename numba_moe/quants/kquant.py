"""Quantizers: Q4_K, Q5_K and Q6_K ported from ggml's reference quantizers,
Q8_0 through ``gguf.quants``.

The k-quant ports follow ``quantize_row_q4_K_ref``, ``quantize_row_q5_K_ref``
and ``quantize_row_q6_K_ref`` of llama.cpp's ``ggml/src/ggml-quants.c``
statement by statement, with their helpers ``make_qkx2_quants`` (scale + min
search, squared error, ``use_mad = false``), ``make_qx_quants``
(``rmse_type = 1``, no importance weights), ``nearest_int`` and the
``get_scale_min_k4`` packing.  All arithmetic is float32 in the C order of
evaluation, without FMA contraction, so the output is byte-identical to the
C code compiled with ``-ffp-contract=off`` (or for a target without FMA, as
x86-64's baseline is).  A C build that contracts ``a += w*x`` into FMAs
(e.g. ``-march=native`` with GCC's default ``-ffp-contract=fast``) can pick a
different scale for a sub-block now and then; both results are valid
encodings of the same search.  ``tests/data/ggml_kquant_ref.npz`` holds
blocks from the compiled C reference that the tests compare against.

Every kernel here uses ``error_model="numpy"``: a float division by zero must
give the IEEE inf/NaN that the C code sees (e.g. a fully saturated fp16
scale), not Numba's default ``ZeroDivisionError``.

``gguf`` has no k-quant quantizers; its Q8_0 quantizer is the bit-exact port
of ``quantize_row_q8_0_ref`` already, so Q8_0 delegates to it.
"""
import gguf
import numpy as np
from numba import njit, prange

from ..errors import MoEError
from .dequant import _scale_min_k4
from .fp16 import f16_to_f32
from .floatbits import f32_to_f16_bits, nearest_int
from .qtypes import as_qtype, block_geometry

__all__ = ["quantize", "quantize_block_q4_k", "quantize_block_q5_k", "quantize_block_q6_k"]

_T = gguf.GGMLQuantizationType

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_GROUP_MAX_EPS = np.float32(1e-15)  # ggml's "all zero" threshold
_RDELTA = np.float32(0.1)


@njit(cache=True, error_model="numpy")
def _make_qkx2_quants(nmax, x, weights, L, Laux, rmin, nstep):
    """ggml ``make_qkx2_quants`` with ``rdelta = 0.1`` and squared error.

    Fits ``x ~= scale * L + min`` (``L`` in 0..nmax, ``min <= 0``) by weighted
    least squares over ``nstep + 1`` trial inverse scales
    ``(nmax + rmin + 0.1 * is) / (max - min)``, keeping the best.

    Parameters
    ----------
    nmax : int
        Largest quant (15 for Q4_K, 31 for Q5_K).
    x, weights : float32[n]
    L : uint8[n]
        Receives the chosen quants.
    Laux : uint8[n]
        Scratch.
    rmin : float32
        First trial offset (-1 for Q4_K, -0.5 for Q5_K).
    nstep : int
        Trials after the first (20 for Q4_K, 15 for Q5_K).

    Returns
    -------
    (scale, neg_min) : float32, float32
        ``neg_min = -min >= 0``, ggml's ``*the_min``.
    """
    n = x.shape[0]
    fnmax = np.float32(nmax)
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > _ZERO:
        mn = _ZERO
    if mx == mn:
        L[:] = 0
        return _ZERO, -mn
    iscale = fnmax / (mx - mn)
    scale = _ONE / iscale
    best_error = _ZERO
    for i in range(n):
        l = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
        L[i] = l
        diff = scale * np.float32(l) + mn - x[i]
        best_error += weights[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + _RDELTA * np.float32(step) + fnmax) / (mx - mn)
        sum_l = _ZERO
        sum_l2 = _ZERO
        sum_xl = _ZERO
        for i in range(n):
            l = max(0, min(nmax, nearest_int(iscale * (x[i] - mn))))
            Laux[i] = l
            w = weights[i]
            fl = np.float32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > _ZERO:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > _ZERO:
                this_min = _ZERO
                this_scale = sum_xl / sum_l2
            cur_error = _ZERO
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                cur_error += weights[i] * (diff * diff)
            if cur_error < best_error:
                L[:] = Laux
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True, error_model="numpy")
def _make_qx_quants_rmse1(nmax, x, L):
    """ggml ``make_qx_quants`` with ``rmse_type = 1`` and no importance
    weights: symmetric quants ``L - nmax`` in ``-nmax..nmax-1``, scale refined
    by ``x**2``-weighted least squares over 19 trial inverse scales.

    Parameters
    ----------
    nmax : int
        32 for Q6_K.
    x : float32[n]
    L : uint8[n]
        Receives ``q + nmax`` (0..2*nmax-1).

    Returns
    -------
    float32
        The scale (its sign follows the largest-magnitude value, so
        ``x ~= scale * (L - nmax)``).
    """
    n = x.shape[0]
    mx = _ZERO
    amax = _ZERO
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < _GROUP_MAX_EPS:
        L[:] = 0
        return _ZERO
    fnmax = np.float32(nmax)
    iscale = -fnmax / mx
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = l + nmax
        w = x[i] * x[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != _ZERO else _ZERO
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fnmax + _RDELTA * np.float32(step)) / mx
        sumlx = _ZERO
        suml2 = _ZERO
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            w = x[i] * x[i]
            fl = np.float32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > _ZERO and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i]))) + nmax
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, error_model="numpy")
def _store_f16(y, at, v):
    """Store ``v`` as little-endian fp16 at ``y[at:at+2]``; return the
    float32 it decodes to (the C code re-reads the rounded scale)."""
    h = f32_to_f16_bits(v)
    y[at] = h & 0xFF
    y[at + 1] = h >> 8
    return f16_to_f32(h)


@njit(cache=True, error_model="numpy")
def _qk_scales_mins(x, nmax, rmin, nstep, y, L):
    """Shared first half of Q4_K / Q5_K: per-sub-block (scale, min) search,
    6-bit packing into ``y[4:16]``, fp16 ``d`` / ``dmin`` into ``y[0:4]``,
    then requantization of ``L`` against the rounded scales."""
    Laux = np.empty(32, np.uint8)
    weights = np.empty(32, np.float32)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        sum_x2 = _ZERO
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.float32(np.sqrt(sum_x2 / np.float32(32)))
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        scale, neg_min = _make_qkx2_quants(nmax, xs, weights, L[32 * j:32 * j + 32], Laux, rmin, nstep)
        scales[j] = scale
        mins[j] = neg_min
        if scale > max_scale:
            max_scale = scale
        if neg_min > max_min:
            max_min = neg_min
    inv_scale = np.float32(63.0) / max_scale if max_scale > _ZERO else _ZERO
    inv_min = np.float32(63.0) / max_min if max_min > _ZERO else _ZERO
    # Packing of sub-block j's 6-bit scale s_j and min m_j into scales[12]
    # (block bytes 4..15), the inverse of _scale_min_k4:
    #
    #   scales[j]     (j < 4)   (s_{j+4} >> 4) << 6 | s_j
    #   scales[j + 4] (j < 4)   (m_{j+4} >> 4) << 6 | m_j
    #   scales[j + 4] (j >= 4)  (m_j & 15) << 4     | (s_j & 15)
    for j in range(8):
        # C stores nearest_int() into a uint8_t before MIN(63, .): keep the wrap.
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            y[4 + j] = ls
            y[8 + j] = lm
        else:
            y[8 + j] = (ls & 0xF) | ((lm & 0xF) << 4)
            y[j] |= (ls >> 4) << 6
            y[4 + j] |= (lm >> 4) << 6
    d = _store_f16(y, 0, max_scale / np.float32(63.0))
    dmin = _store_f16(y, 2, max_min / np.float32(63.0))
    for j in range(8):
        sc, m = _scale_min_k4(4, y, j)
        ds = d * np.float32(sc)
        if ds == _ZERO:
            continue  # keeps the search's quants, as the C code does
        dm = dmin * np.float32(m)
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, nearest_int((x[32 * j + ii] + dm) / ds)))


@njit(cache=True, error_model="numpy")
def quantize_block_q4_k(x, y):
    """Quantize 256 float32 values into one Q4_K block (ggml reference).

    Parameters
    ----------
    x : float32[256]
    y : uint8[144]
        Receives ``d``, ``dmin``, ``scales[12]``, ``qs[128]``.
    """
    L = np.empty(256, np.uint8)
    _qk_scales_mins(x, 15, np.float32(-1.0), 20, y, L)
    # qs[32c + l] = L[64c + l] | L[64c + 32 + l] << 4   (c = 0..3, l = 0..31)
    for c in range(4):
        for l in range(32):
            y[16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4)


@njit(cache=True, error_model="numpy")
def quantize_block_q5_k(x, y):
    """Quantize 256 float32 values into one Q5_K block (ggml reference).

    Parameters
    ----------
    x : float32[256]
    y : uint8[176]
        Receives ``d``, ``dmin``, ``scales[12]``, ``qh[32]``, ``qs[128]``.
    """
    L = np.empty(256, np.uint8)
    _qk_scales_mins(x, 31, np.float32(-0.5), 15, y, L)
    # With c = 0..3, l = 0..31, a = L[64c + l], b = L[64c + 32 + l]:
    #
    #   qs[32c + l] = (a & 15) | (b & 15) << 4
    #   qh[l]      |= (a >> 4) << 2c | (b >> 4) << (2c + 1)
    for l in range(32):
        y[16 + l] = 0
    for c in range(4):
        for l in range(32):
            a = L[64 * c + l]
            b = L[64 * c + 32 + l]
            y[48 + 32 * c + l] = (a & 15) | ((b & 15) << 4)
            y[16 + l] |= ((a >> 4) << (2 * c)) | ((b >> 4) << (2 * c + 1))


@njit(cache=True, error_model="numpy")
def quantize_block_q6_k(x, y):
    """Quantize 256 float32 values into one Q6_K block (ggml reference).

    Parameters
    ----------
    x : float32[256]
    y : uint8[210]
        Receives ``ql[128]``, ``qh[64]``, ``scales`` int8[16], ``d``.
    """
    L = np.empty(256, np.uint8)
    scales = np.empty(16, np.float32)
    max_scale = _ZERO
    max_abs_scale = _ZERO
    for ib in range(16):
        scale = _make_qx_quants_rmse1(32, x[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16])
        scales[ib] = scale
        abs_scale = abs(scale)
        if abs_scale > max_abs_scale:
            max_abs_scale = abs_scale
            max_scale = scale
    if max_abs_scale < _GROUP_MAX_EPS:
        y[:] = 0
        return
    iscale = np.float32(-128.0) / max_scale
    d = _store_f16(y, 208, _ONE / iscale)
    for ib in range(16):
        # C assigns the int to an int8_t (wraps); the byte is the same.
        y[192 + ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF
    for j in range(16):
        ds = d * np.float32(np.int8(y[192 + j]))
        if ds == _ZERO:
            continue  # keeps the search's quants, as the C code does
        for ii in range(16):
            L[16 * j + ii] = max(-32, min(31, nearest_int(x[16 * j + ii] / ds))) + 32
    # Two halves h = 0, 1; with l = 0..31 and a..b..c..e = L[128h + l + 0/32/64/96]:
    #
    #   ql[64h + l]      = (a & 15) | (c & 15) << 4
    #   ql[64h + 32 + l] = (b & 15) | (e & 15) << 4
    #   qh[32h + l]      = a >> 4 | (b >> 4) << 2 | (c >> 4) << 4 | (e >> 4) << 6
    for h in range(2):
        for l in range(32):
            a = L[128 * h + l]
            b = L[128 * h + 32 + l]
            c = L[128 * h + 64 + l]
            e = L[128 * h + 96 + l]
            y[64 * h + l] = (a & 15) | ((c & 15) << 4)
            y[64 * h + 32 + l] = (b & 15) | ((e & 15) << 4)
            y[128 + 32 * h + l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q4_k_blocks(x, y):
    for i in prange(x.shape[0]):
        quantize_block_q4_k(x[i], y[i])


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q5_k_blocks(x, y):
    for i in prange(x.shape[0]):
        quantize_block_q5_k(x[i], y[i])


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q6_k_blocks(x, y):
    for i in prange(x.shape[0]):
        quantize_block_q6_k(x[i], y[i])


_NATIVE_QUANTIZERS = {
    _T.Q4_K: _quantize_q4_k_blocks,
    _T.Q5_K: _quantize_q5_k_blocks,
    _T.Q6_K: _quantize_q6_k_blocks,
}


def quantize(data, qtype):
    """Encode float values as GGML blocks, like ``gguf.quants.quantize``.

    Parameters
    ----------
    data : array_like of float16/float32/float64, shape (..., n)
        Values; each row along the last axis is quantized on its own. Cast
        to a C-contiguous float32 copy when it is not one already.
    qtype : GGMLQuantizationType or str
        Q4_K, Q5_K and Q6_K use the native ports of ggml's reference
        quantizers; every other type goes to ``gguf.quants.quantize`` (Q8_0,
        Q4_0, Q5_0, BF16, ...) with gguf's conventions (F32 returns float32,
        F16 returns float16 values rather than bytes).

    Returns
    -------
    numpy.ndarray of uint8, shape (..., n // block_values * block_bytes)

    Raises
    ------
    MoEError
        Unknown type, non-float data, 0-d data, ``n`` not a multiple of the
        type's block size, or a type gguf cannot quantize either.

    Notes
    -----
    Inputs with inf or NaN raise no error and give what the C reference
    gives (garbage quants, NaN scales) -- byte for byte with inf; with
    several NaNs of different payloads in one block, x86 NaN propagation
    can pick another payload than the C build did, and the garbage differs.
    """
    qt = as_qtype(qtype)
    block_values, block_bytes = block_geometry(qt)
    x = np.asarray(data)
    if x.dtype.kind != "f":
        raise MoEError(f"data: expected a float16/float32/float64 array, got dtype {x.dtype}")
    if x.ndim < 1:
        raise MoEError("data: expected at least 1 dimension (values last), got a 0-d array")
    if x.shape[-1] % block_values:
        raise MoEError(
            f"data: last axis has {x.shape[-1]} values, not a multiple of the "
            f"{qt.name} block size {block_values}"
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    kernel = _NATIVE_QUANTIZERS.get(qt)
    if kernel is None:
        try:
            return gguf.quants.quantize(x, qt)
        except NotImplementedError as exc:
            raise MoEError(f"qtype: {qt.name} cannot be quantized (gguf.quants: {exc})") from None
    out = np.empty(x.shape[:-1] + (x.shape[-1] // block_values * block_bytes,), dtype=np.uint8)
    if out.size:
        kernel(x.reshape(-1, block_values), out.reshape(-1, block_bytes))
    return out

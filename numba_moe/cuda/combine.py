"""Weighted combine of the expert rows back into token order, on the device.

``out[t] = sum_k w[t, k] * rows[pairs_by_token[t * K + k]]`` (+ the shared
expert's row), accumulated in float32 in k order and *assigned* to ``out``
(stale contents never leak in).  The shared expert's weight is 1, or
``sigmoid(logits[t, E])`` when the router matrix carries the shared gate as
its extra row (qwen2moe).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from ..errors import MoEError
from .primitives import load4

__all__ = ["launch_combine", "combine", "combine_kernel", "SHARED_NONE", "SHARED_PLAIN",
           "SHARED_GATED"]

SHARED_NONE = 0
SHARED_PLAIN = 1
SHARED_GATED = 2

# combine kernels by pairs a token unrolled (0: none)
_kernels = {}


def combine_kernel(unroll_k: int):
    """The combine kernel, made once per ``unroll_k``.

    Signature::

        kernel[(n_tok, -(-width // (4 * threads))), threads, stream](
            rows, pairs_by_token, weights, top_k, width, shared_mode, sh_rows,
            logits, lstride, lcol, out)

    Thread owns 4 consecutive columns of token ``blockIdx.x`` (tokens on x:
    gridDim.y stops at 65535).  ``unroll_k`` = 0: any ``top_k``, the slot of
    pair ``p`` from ``pairs_by_token``.  ``unroll_k`` = K > 0: the plan of
    one slot per pair of a decode step (pair ``p`` in slot ``p``,
    ``pairs_by_token`` and ``top_k`` not read) with K a constant, so that
    the loop over the pairs is unrolled and their loads are all in flight
    at once: one round of loads instead of four (K = 8 in a loop unrolled by
    4, each pass a slot's load, then its row's; H100, 2048 columns, T=1
    3.0 -> 2.0 us).  Many tokens gain nothing from it (T=512 7.5 ->
    9.6 us).
    """
    if unroll_k not in _kernels:
        _kernels[unroll_k] = _make_combine(unroll_k)
    return _kernels[unroll_k]


def _make_combine(unroll_k: int):
    @cuda.jit
    def kernel(rows, pairs_by_token, weights, top_k, width, shared_mode, sh_rows, logits,
               lstride, lcol, out):
        t = cuda.blockIdx.x
        h = (cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x) * 4
        if h >= width:
            return
        kk = unroll_k if unroll_k else top_k
        a0 = float32(0)
        a1 = float32(0)
        a2 = float32(0)
        a3 = float32(0)
        for k in range(kk):
            p = t * kk + k
            w = weights[p]
            slot = p if unroll_k else pairs_by_token[p]
            v0, v1, v2, v3 = load4(rows, slot * width + h)
            a0 += w * v0
            a1 += w * v1
            a2 += w * v2
            a3 += w * v3
        if shared_mode != SHARED_NONE:
            sw = float32(1)
            if shared_mode == SHARED_GATED:
                sw = float32(1) / (float32(1) + math.exp(-logits[t * lstride + lcol]))
            v0, v1, v2, v3 = load4(sh_rows, t * width + h)
            a0 += sw * v0
            a1 += sw * v1
            a2 += sw * v2
            a3 += sw * v3
        o = t * width + h
        out[o] = a0
        out[o + 1] = a1
        out[o + 2] = a2
        out[o + 3] = a3

    return kernel


def launch_combine(rows, pairs_by_token, weights, n_tok, top_k, width, shared_mode, sh_rows,
                   logits, lstride, lcol, out, threads, stream, by_pair=False):
    """Launch the combine kernel on flat device buffers (no checks, no
    allocation); ``by_pair``: slot ``p`` holds pair ``p`` (``pairs_by_token``
    unread; the kernel of :func:`combine_kernel` ``(top_k)``)."""
    grid = (n_tok, -(-width // (4 * threads)))
    combine_kernel(top_k if by_pair else 0)[grid, threads, stream](
        rows, pairs_by_token, weights, top_k, width, shared_mode, sh_rows, logits, lstride,
        lcol, out)


def combine(rows, pairs_by_token, expert_weights, stream=0, out=None):
    """Combine expert output rows into token order on the GPU (no shared expert).

    Parameters
    ----------
    rows : float32 (P, W), numpy or device
        Expert output rows by slot; W a multiple of 4.
    pairs_by_token : int32 (T, K), numpy or device
        Slot of each pair, a permutation of ``range(P)``, ``P = T * K``.
    expert_weights : float32 (T, K), numpy or device
    stream : numba stream, optional
    out : device float32 (T, W), optional
        Destination (else allocated).

    Returns
    -------
    device float32 (T, W)
    """
    from ..config import CUDA_LAUNCH
    from .arrays import as_device_2d, check_out

    d_rows = as_device_2d("rows", rows, np.float32, stream)
    d_pbt = as_device_2d("pairs_by_token", pairs_by_token, np.int32, stream)
    d_w = as_device_2d("expert_weights", expert_weights, np.float32, stream)
    n_tok, top_k = d_pbt.shape
    if d_w.shape != (n_tok, top_k):
        raise MoEError(f"expert_weights must have shape {(n_tok, top_k)}, got {d_w.shape}")
    n_rows, width = d_rows.shape
    if n_rows != n_tok * top_k or width % 4:
        raise MoEError(f"rows must have shape ({n_tok * top_k}, W) with W a multiple of 4, "
                       f"got {d_rows.shape}")
    host_pbt = d_pbt.copy_to_host(stream=stream)
    if host_pbt.size and (host_pbt.min() < 0 or host_pbt.max() >= n_rows):
        raise MoEError(f"pairs_by_token must hold slots in [0, {n_rows})")
    if out is None:
        out = cuda.device_array((n_tok, width), np.float32, stream=stream)
    else:
        out = check_out("out", out, np.float32, (n_tok, width))
    if n_tok:
        flat_rows = d_rows.reshape(d_rows.size)
        launch_combine(flat_rows, d_pbt.reshape(d_pbt.size), d_w.reshape(d_w.size), n_tok,
                       top_k, width, SHARED_NONE, flat_rows, d_w.reshape(d_w.size), 0, 0,
                       out.reshape(out.size), CUDA_LAUNCH.threads, stream)
    return out

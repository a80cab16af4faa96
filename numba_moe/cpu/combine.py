"""Weighted combine of the per-slot expert outputs (+ the shared expert).

``out[t] = sum_k w[t, k] * y[pairs_by_token[t*K + k]]  (+ s_t * ys[t])``

The first term is assigned, later ones added, all inside one call: ``out``
never accumulates into memory left over from an earlier call.  The shared
expert's factor ``s_t`` is 1 (deepseek2) or ``sigmoid(x[t] . gate_inp)``
(qwen2moe).
"""
import numpy as np
from numba import njit, prange

from ..errors import MoEError
from ..threading_guard import parallel_launch

__all__ = ["combine", "combine_into", "SHARED_NONE", "SHARED_PLAIN", "SHARED_GATED"]

#: Shared-expert modes of :func:`combine`.
SHARED_NONE = 0
SHARED_PLAIN = 1
SHARED_GATED = 2


# Below this many multiply-adds the combine runs on the caller's thread.
SERIAL_MAX_MACS = 1 << 17
# reassoc/contract only let the x . gate_inp sum vectorize; the k-sum order
# is fixed by the loop.
_FASTMATH = {"reassoc", "contract"}


@njit(inline="always", cache=True)
def _combine_loop(y, pairs_by_token, pair_weights, top_k, shared_mode, ys, gate_inp, x, out):
    """One token row per ``prange`` iteration; see the module docstring."""
    n_tok, hidden = out.shape
    for t in prange(n_tok):
        o = out[t]
        base = t * top_k
        w = pair_weights[base]
        src = y[pairs_by_token[base]]
        for c in range(hidden):
            o[c] = w * src[c]
        for k in range(1, top_k):
            w = pair_weights[base + k]
            src = y[pairs_by_token[base + k]]
            for c in range(hidden):
                o[c] += w * src[c]
        if shared_mode != SHARED_NONE:
            s = np.float32(1.0)
            if shared_mode == SHARED_GATED:
                xt = x[t]
                z = np.float32(0.0)
                for c in range(hidden):
                    z += xt[c] * gate_inp[c]
                s = np.float32(1.0) / (np.float32(1.0) + np.exp(-z))
            src = ys[t]
            for c in range(hidden):
                o[c] += s * src[c]


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _combine_parallel(y, pairs_by_token, pair_weights, top_k, shared_mode, ys, gate_inp, x, out):
    _combine_loop(y, pairs_by_token, pair_weights, top_k, shared_mode, ys, gate_inp, x, out)


@njit(cache=True, fastmath=_FASTMATH)
def _combine_serial(y, pairs_by_token, pair_weights, top_k, shared_mode, ys, gate_inp, x, out):
    _combine_loop(y, pairs_by_token, pair_weights, top_k, shared_mode, ys, gate_inp, x, out)


def combine_into(y, pairs_by_token, pair_weights, top_k, shared_mode, ys, gate_inp, x, out):
    """Kernel launch of :func:`combine` without validation (serial when small)."""
    if out.shape[0] * out.shape[1] * (top_k + 1) <= SERIAL_MAX_MACS:
        _combine_serial(y, pairs_by_token, pair_weights, top_k, shared_mode, ys, gate_inp, x, out)
    else:
        with parallel_launch():
            _combine_parallel(y, pairs_by_token, pair_weights, top_k, shared_mode, ys, gate_inp,
                              x, out)


def combine(y, pairs_by_token, pair_weights, top_k, out, shared=None, gate_inp=None, x=None):
    """Weighted sum of expert outputs per token.

    Parameters
    ----------
    y : ndarray of float32, shape (>= T*K, H), C-contiguous
        Expert output per slot.
    pairs_by_token : ndarray of int32, shape (T*K,)
        Slot of pair ``t*K + k`` (``BucketPlan.pairs_by_token``).
    pair_weights : ndarray of float32, shape (T*K,)
        Router weight of pair ``t*K + k``.
    top_k : int
    out : ndarray of float32, shape (T, H), C-contiguous
        Receives the result (every element assigned).
    shared : ndarray of float32, shape (>= T, H), optional
        Shared-expert output per token.
    gate_inp : ndarray of float32, shape (H,), optional
        qwen2moe's shared gate: ``shared`` is scaled by ``sigmoid(x[t] . gate_inp)``
        (needs ``x``).  Without it the shared output is added unscaled.
    x : ndarray of float32, shape (T, H), optional
        Layer input, for ``gate_inp``.

    Returns
    -------
    ndarray
        ``out``.
    """
    arrays = (("y", y, np.float32, 2), ("pairs_by_token", pairs_by_token, np.int32, 1),
              ("pair_weights", pair_weights, np.float32, 1), ("out", out, np.float32, 2))
    for name, a, dtype, ndim in arrays:
        if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != ndim \
                or not a.flags.c_contiguous:
            raise MoEError(f"{name}: expected a C-contiguous {np.dtype(dtype).name} "
                           f"{ndim}-D numpy array")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise MoEError(f"top_k={top_k!r}: expected an integer >= 1")
    n_tok, hidden = out.shape
    pairs = n_tok * int(top_k)
    if pairs_by_token.shape != (pairs,) or pair_weights.shape != (pairs,):
        raise MoEError(f"pairs_by_token / pair_weights: expected shape ({pairs},)")
    if y.ndim != 2 or y.shape[1] != hidden or y.shape[0] < pairs:
        raise MoEError(f"y: expected shape [>= {pairs}, {hidden}]")
    if pairs and (pairs_by_token.min() < 0 or pairs_by_token.max() >= y.shape[0]):
        raise MoEError("pairs_by_token: slot index out of range of y")
    if shared is None:
        mode, shared, gate_inp, x = SHARED_NONE, y[:0], out[0, :0], out[:0]
    elif gate_inp is None:
        mode, gate_inp, x = SHARED_PLAIN, out[0, :0], out[:0]
    else:
        if x is None or x.shape != (n_tok, hidden) or gate_inp.shape != (hidden,):
            raise MoEError(f"gate_inp needs x [{n_tok}, {hidden}] and gate_inp [{hidden}]")
        mode = SHARED_GATED
    if mode != SHARED_NONE and (shared.shape[0] < n_tok or shared.shape[1] != hidden):
        raise MoEError(f"shared: expected shape [>= {n_tok}, {hidden}]")
    combine_into(y, pairs_by_token, pair_weights, int(top_k), mode, shared, gate_inp, x, out)
    return out

"""Top-k expert routing: router logits -> (expert ids, combine weights).

One router step of every supported architecture (SPEC section 5):

1. probabilities ``p`` in float32: softmax over the E logits (maximum
   subtracted) or an element-wise sigmoid; ``softmax_weight`` keeps the raw
   logits for selection instead;
2. selection score ``s = p + selection_bias`` (the bias only selects, the
   weights use ``p``);
3. with ``n_group > 1``, the E experts form ``n_group`` equal groups scored by
   the sum of their two best ``s`` (a one-expert group by its only ``s``);
   only the ``topk_group`` best groups stay eligible;
4. top-k by repeated argmax over ``s``, ties to the lower expert index, so
   the ids come out in descending selection score;
5. weights: ``p`` of the chosen experts, divided by their sum when
   ``norm_topk_prob`` (a sum <= 0 gives 1/K each), times ``scale``.
   ``softmax_weight`` instead takes a softmax over the k chosen logits.

Precision: each exponential and every sum runs in float64 and a probability
is rounded to float32 once, so the float32 probabilities (on which selection
and ties are decided) are within one ulp of exact; the final weight is
rounded to float32 once more after normalisation and scaling.

NaN and infinite logits never give an out-of-range id.  A NaN selection
score compares as ``-inf``, and when every remaining candidate is ``-inf``
the lowest unused index is taken, so a row whose scores are all NaN selects
experts ``0 .. K-1``.  NaN propagates into the weights instead: one NaN
logit makes the whole softmax row NaN (its weights are NaN); under sigmoid
it only disqualifies that expert.  A ``+inf`` logit under softmax likewise
gives NaN weights.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Tuple

import numpy as np
from numba import njit, prange

from .errors import MoEError
from .threading_guard import parallel_launch

__all__ = ["RouterOutput", "GATINGS", "route", "route_into", "route_scratch_shape"]

#: Gating names accepted by :func:`route`, and their kernel codes.
GATINGS = {"softmax": 0, "sigmoid": 1, "softmax_weight": 2}
_SOFTMAX = 0
_SIGMOID = 1
_SOFTMAX_WEIGHT = 2

# "No selection bias" without an allocation per call: the kernel tests the length.
_NO_BIAS = np.zeros(0, dtype=np.float32)


class RouterOutput(NamedTuple):
    """Result of :func:`route`.

    Attributes
    ----------
    expert_ids : ndarray of int32, shape (T, K)
        Chosen experts of each token, in descending selection score.
    expert_weights : ndarray of float32, shape (T, K)
        Combine weight of each chosen expert.
    """

    expert_ids: np.ndarray
    expert_weights: np.ndarray


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------

@njit(cache=True)
def _probabilities(x, gating, probs):
    """float32 probabilities of one token's logits ``x`` into ``probs``."""
    n = x.shape[0]
    if gating == _SOFTMAX:
        # NaN never wins the comparison, so the max is over the other logits;
        # a NaN logit still turns the whole row NaN through the sum.
        m = -np.inf
        for e in range(n):
            if x[e] > m:
                m = np.float64(x[e])
        s = 0.0
        for e in range(n):
            s += math.exp(np.float64(x[e]) - m)
        # Recomputing exp beats a float64 scratch row: E is small.
        for e in range(n):
            probs[e] = math.exp(np.float64(x[e]) - m) / s
    elif gating == _SIGMOID:
        for e in range(n):
            probs[e] = 1.0 / (1.0 + math.exp(-np.float64(x[e])))
    else:
        for e in range(n):
            probs[e] = x[e]


def group_score(sel, base, g, gsize):
    """Score of group ``g`` of the experts' selection scores ``sel[base :]``
    (NaN-free float32, groups of ``gsize``): its best score plus its second
    best (the best alone for groups of one).

    Plain Python, compiled for both devices: by ``njit`` here and as a CUDA
    device function by :mod:`numba_moe.cuda.routing`, so both rank groups
    with the same arithmetic.
    """
    b1 = np.float32(-np.inf)
    b2 = np.float32(-np.inf)
    for e in range(g * gsize, (g + 1) * gsize):
        v = sel[base + e]
        if v > b1:
            b2 = b1
            b1 = v
        elif v > b2:
            b2 = v
    gs = b1 if gsize == 1 else b1 + b2
    # +inf + -inf: a group with no usable score ranks last
    return gs if gs == gs else np.float32(-np.inf)


_group_score = njit(cache=True)(group_score)


@njit(cache=True)
def _select_groups(sel, n_group, topk_group, gscore):
    """Mask (``-inf``) every expert outside the ``topk_group`` best groups.

    ``sel`` holds NaN-free selection scores; ``gscore`` is [n_group] scratch.
    """
    gsize = sel.shape[0] // n_group
    for g in range(n_group):
        gscore[g] = _group_score(sel, 0, g, gsize)
    for _ in range(topk_group):
        best = -1
        bv = np.float32(-np.inf)
        for g in range(n_group):
            v = gscore[g]
            if v != v:
                continue
            if best < 0 or v > bv:
                best = g
                bv = v
        # NaN marks a kept group (real group scores are NaN-free)
        gscore[best] = np.nan
    for g in range(n_group):
        if gscore[g] == gscore[g]:
            for e in range(g * gsize, (g + 1) * gsize):
                sel[e] = -np.inf


@njit(cache=True)
def _top_k(sel, top_k, ids, vals):
    """The ``top_k`` largest of the NaN-free ``sel`` into ``ids`` / ``vals``.

    Keeps ``(ids, vals)`` sorted by descending value, ties by ascending index
    (the result of repeated argmax with ties to the lower index).  One pass:
    an expert enters only if it beats the current K-th value strictly, so
    ties keep the lower index, and the first K experts fill the buffer even
    at ``-inf``, so every id is valid.
    """
    count = 0
    for e in range(sel.shape[0]):
        v = sel[e]
        if count == top_k:
            if not v > vals[top_k - 1]:
                continue
            j = top_k - 1
        else:
            j = count
            count += 1
        while j > 0 and v > vals[j - 1]:
            vals[j] = vals[j - 1]
            ids[j] = ids[j - 1]
            j -= 1
        vals[j] = v
        ids[j] = e


@njit(cache=True)
def _route_row(x, bias, gating, top_k, norm, n_group, topk_group, scale,
               ids, weights, probs, sel, gscore):
    """Route one token: logits ``x`` [E] -> ``ids`` [K], ``weights`` [K].

    ``probs``, ``sel`` ([E] each) and ``gscore`` ([n_group]) are float32 scratch.
    """
    n = x.shape[0]
    _probabilities(x, gating, probs)
    has_bias = bias.shape[0] > 0
    for e in range(n):
        v = probs[e] + bias[e] if has_bias else probs[e]
        sel[e] = v if v == v else np.float32(-np.inf)
    if n_group > 1:
        _select_groups(sel, n_group, topk_group, gscore)
    # the weights row holds the selection scores until the weights replace them
    _top_k(sel, top_k, ids, weights)
    if gating == _SOFTMAX_WEIGHT:
        # the chosen logits are in descending order unless NaN, so take the max
        m = -np.inf
        for k in range(top_k):
            if x[ids[k]] > m:
                m = np.float64(x[ids[k]])
        s = 0.0
        for k in range(top_k):
            s += math.exp(np.float64(x[ids[k]]) - m)
        for k in range(top_k):
            weights[k] = math.exp(np.float64(x[ids[k]]) - m) / s * scale
        return
    s = 1.0
    if norm:
        s = 0.0
        for k in range(top_k):
            s += np.float64(probs[ids[k]])
    if norm and s <= 0.0:
        for k in range(top_k):
            weights[k] = scale / top_k
    else:
        for k in range(top_k):
            weights[k] = np.float64(probs[ids[k]]) / s * scale


@njit(cache=True)
def _route_token(t, logits, bias, gating, top_k, norm, n_group, topk_group, scale,
                 out_ids, out_weights, scratch):
    """Route token ``t``, slicing its scratch row into probs / scores / groups."""
    n = logits.shape[1]
    row = scratch[t]
    _route_row(logits[t], bias, gating, top_k, norm, n_group, topk_group, scale,
               out_ids[t], out_weights[t], row[:n], row[n:2 * n], row[2 * n:2 * n + n_group])


@njit(parallel=True, cache=True)
def _route_parallel(logits, bias, gating, top_k, norm, n_group, topk_group, scale,
                    out_ids, out_weights, scratch):
    """Route every token of ``logits`` [T, E], one token per prange iteration.

    Arguments as :func:`route_into` after validation: ``bias`` float32 [E] or
    [0] for none, ``gating`` a :data:`GATINGS` code, ``scale`` float64.
    """
    for t in prange(logits.shape[0]):
        _route_token(t, logits, bias, gating, top_k, norm, n_group, topk_group, scale,
                     out_ids, out_weights, scratch)


@njit(cache=True)
def _route_serial(logits, bias, gating, top_k, norm, n_group, topk_group, scale,
                  out_ids, out_weights, scratch):
    """:func:`_route_parallel` on the calling thread, for small batches."""
    for t in range(logits.shape[0]):
        _route_token(t, logits, bias, gating, top_k, norm, n_group, topk_group, scale,
                     out_ids, out_weights, scratch)


# A token costs about 15 ns per expert on one thread.  A parallel region costs
# microseconds to start, and milliseconds when another process holds a core
# (the join waits for a scheduler slice), so only batches of at least 16k
# logits (T=128 at E=128) go parallel; decode stays on the calling thread.
_PARALLEL_MIN_LOGITS = 16384


# --------------------------------------------------------------------------
# validation and public wrappers
# --------------------------------------------------------------------------

def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MoEError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if not lo <= v <= hi:
        raise MoEError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def _check_params(num_experts, top_k, norm_topk_prob, gating, selection_bias,
                  n_group, topk_group, scale):
    """Validate the routing options; returns them in the kernel's types."""
    if num_experts < 1:
        raise MoEError(f"logits must have at least one expert column, got E={num_experts}")
    top_k = _check_int("top_k", top_k, 1, num_experts)
    if gating not in GATINGS:
        raise MoEError(f"gating must be one of {sorted(GATINGS)}, got {gating!r}")
    if not isinstance(norm_topk_prob, (bool, np.bool_)):
        raise MoEError(f"norm_topk_prob must be a bool, got {norm_topk_prob!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise MoEError(f"scale must be a real number, got {scale!r}")
    n_group = _check_int("n_group", n_group, 1, num_experts)
    if num_experts % n_group:
        raise MoEError(f"n_group={n_group} must divide the number of experts E={num_experts}")
    topk_group = _check_int("topk_group", topk_group, 1, n_group)
    if topk_group * (num_experts // n_group) < top_k:
        raise MoEError(
            f"topk_group={topk_group} groups of {num_experts // n_group} experts "
            f"cannot supply top_k={top_k} experts")
    if selection_bias is None:
        bias = _NO_BIAS
    else:
        bias = np.asarray(selection_bias)
        if bias.shape != (num_experts,):
            raise MoEError(f"selection_bias must have shape ({num_experts},), got {bias.shape}")
        if bias.dtype.kind != "f":
            raise MoEError(f"selection_bias must be a float array, got dtype {bias.dtype}")
        bias = np.ascontiguousarray(bias, dtype=np.float32)
    return top_k, bool(norm_topk_prob), GATINGS[gating], bias, n_group, topk_group, float(scale)


def route_scratch_shape(num_tokens: int, num_experts: int, n_group: int = 1) -> Tuple[int, int]:
    """Smallest ``scratch`` shape :func:`route_into` accepts.

    Parameters
    ----------
    num_tokens, num_experts, n_group : int
        T, E and the expert group count of the router.

    Returns
    -------
    (int, int)
        ``(T, 2 * E + n_group)``: per token, the float32 probabilities [E],
        the selection scores [E] and the group scores [n_group].
    """
    return (int(num_tokens), 2 * int(num_experts) + int(n_group))


def route(logits, top_k, norm_topk_prob=True, gating="softmax", selection_bias=None,
          n_group=1, topk_group=1, scale=1.0) -> RouterOutput:
    """Pick the top-k experts of every token and their combine weights.

    Parameters
    ----------
    logits : ndarray of float32, shape (T, E)
        Router logits (``x @ W_router.T``).  float64 is converted to float32
        first (a copy); a non-contiguous array is copied.  Other dtypes raise.
    top_k : int
        Experts per token K, ``1 <= K <= E``.
    norm_topk_prob : bool
        Divide the K chosen probabilities by their sum (1/K each when the sum
        is <= 0).  No effect for ``softmax_weight``, whose K weights already
        sum to one.
    gating : {'softmax', 'sigmoid', 'softmax_weight'}
        Probability function; ``softmax_weight`` selects on the raw logits and
        takes a softmax over the K chosen logits.
    selection_bias : array of float, shape (E,), optional
        Added to the probabilities for selection only (DeepSeek-V3
        ``exp_probs_b``); a NaN score compares as ``-inf``.
    n_group, topk_group : int
        Group-limited routing: E splits into ``n_group`` equal groups and only
        the ``topk_group`` groups with the best sum of their two best scores
        stay eligible.  ``topk_group * E / n_group`` must be >= K.
    scale : float
        Multiplies every weight (``expert_weights_scale``).

    Returns
    -------
    RouterOutput
        ``expert_ids`` int32 (T, K) in descending selection score (ties to the
        lower index) and ``expert_weights`` float32 (T, K).

    Raises
    ------
    MoEError
        Wrong dtype or ndim of ``logits``, or an option out of range.

    Notes
    -----
    NaN logits never give an out-of-range id; see the module docstring.
    """
    logits = _as_logits(logits, copy_ok=True)
    n_tok, n = logits.shape
    params = _check_params(n, top_k, norm_topk_prob, gating, selection_bias,
                           n_group, topk_group, scale)
    k = params[0]
    ids = np.empty((n_tok, k), dtype=np.int32)
    weights = np.empty((n_tok, k), dtype=np.float32)
    scratch = np.empty(route_scratch_shape(n_tok, n, params[4]), dtype=np.float32)
    _launch(logits, params, ids, weights, scratch)
    return RouterOutput(ids, weights)


def route_into(logits, out_ids, out_weights, scratch, top_k, norm_topk_prob=True,
               gating="softmax", selection_bias=None, n_group=1, topk_group=1,
               scale=1.0) -> RouterOutput:
    """:func:`route` into caller-owned buffers, without allocating.

    Parameters
    ----------
    logits : ndarray of float32, shape (T, E), C-contiguous
        Router logits (no conversion is done here).
    out_ids : ndarray of int32, shape (T, K), C-contiguous
        Receives the expert ids.
    out_weights : ndarray of float32, shape (T, K), C-contiguous
        Receives the weights.
    scratch : ndarray of float32, shape (>= T, >= 2 * E + n_group), C-contiguous
        Working memory, see :func:`route_scratch_shape`; allocate it once for
        the largest T and reuse it.
    top_k, norm_topk_prob, gating, selection_bias, n_group, topk_group, scale
        As in :func:`route`.  A float32 C-contiguous ``selection_bias`` is
        used without a copy.

    Returns
    -------
    RouterOutput
        ``(out_ids, out_weights)``.

    Raises
    ------
    MoEError
        Any argument of the wrong dtype, shape or layout, or an option out of
        range.
    """
    logits = _as_logits(logits, copy_ok=False)
    n_tok, n = logits.shape
    params = _check_params(n, top_k, norm_topk_prob, gating, selection_bias,
                           n_group, topk_group, scale)
    k = params[0]
    _check_buffer("out_ids", out_ids, np.int32, (n_tok, k))
    _check_buffer("out_weights", out_weights, np.float32, (n_tok, k))
    if not (isinstance(scratch, np.ndarray) and scratch.dtype == np.float32
            and scratch.ndim == 2 and scratch.flags.c_contiguous):
        raise MoEError("scratch must be a C-contiguous float32 2-D array")
    need = route_scratch_shape(n_tok, n, params[4])
    if scratch.shape[0] < need[0] or scratch.shape[1] < need[1]:
        raise MoEError(f"scratch must have shape at least {need}, got {scratch.shape}")
    _launch(logits, params, out_ids, out_weights, scratch)
    return RouterOutput(out_ids, out_weights)


def _launch(logits, params, ids, weights, scratch) -> None:
    top_k, norm, gating, bias, n_group, topk_group, scale = params
    if logits.shape[0] == 0:
        return
    if logits.size >= _PARALLEL_MIN_LOGITS:
        with parallel_launch():
            _route_parallel(logits, bias, gating, top_k, norm, n_group, topk_group, scale, ids,
                            weights, scratch)
    else:
        _route_serial(logits, bias, gating, top_k, norm, n_group, topk_group, scale, ids,
                      weights, scratch)


def _as_logits(logits, copy_ok: bool) -> np.ndarray:
    if not isinstance(logits, np.ndarray):
        if not copy_ok:
            raise MoEError(f"logits must be a numpy array, got {type(logits).__name__}")
        logits = np.asarray(logits)
    if logits.ndim != 2:
        raise MoEError(f"logits must be 2-D (T, E), got shape {logits.shape}")
    if logits.dtype == np.float32 and logits.flags.c_contiguous:
        return logits
    if not copy_ok:
        raise MoEError(f"logits must be C-contiguous float32, got {logits.dtype}"
                       f"{'' if logits.flags.c_contiguous else ' (non-contiguous)'}")
    if logits.dtype not in (np.float32, np.float64):
        raise MoEError(f"logits must be float32 (or float64, converted), got {logits.dtype}")
    return np.ascontiguousarray(logits, dtype=np.float32)


def _check_buffer(name: str, arr, dtype, shape) -> None:
    if not isinstance(arr, np.ndarray) or arr.dtype != dtype:
        got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise MoEError(f"{name} must be a {np.dtype(dtype).name} array, got {got}")
    if arr.shape != shape:
        raise MoEError(f"{name} must have shape {shape}, got {arr.shape}")
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        raise MoEError(f"{name} must be C-contiguous and writeable")

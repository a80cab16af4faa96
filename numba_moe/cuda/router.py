"""Router logits of a small batch: one block per router row, then routing and
plan by the last block.

The router matrix is small (E x H float32, 1 MiB for Qwen3-30B-A3B) and a
decode step has few tokens, so a GEMV that gives each row to a few lanes
leaves most of the GPU idle and waits on one load after another.  Here
block ``r`` computes row ``r``'s logits for every token: its threads split
the row's columns (one 16-byte load each per step), multiply them with
:data:`TOKENS` tokens at a time, and reduce over the block.  Every row is
read once per pass of tokens; the activations come from L2.

The same launch also writes the 16-bit codes of ``x`` (:mod:`.actquant`)
when the experts' GEMV needs them, routes the tokens and builds the plan
(:class:`Tail`): the block that finishes last (a counter in
global memory, after a fence: every other block's logits are visible to it)
runs :func:`.routing.route_token` for each token, a warp a token, and
:func:`.plan.plan_block`, then resets the counter for the next launch.  A
decode step is then one launch where it was three, each a chain of
dependent latencies of a few microseconds.
"""
from __future__ import annotations

from typing import NamedTuple

from numba import cuda, float32, int32, int64

from .actquant import GROUP, quantize_groups
from .plan import DevicePlan, plan_block
from .primitives import load4, seg_sum, warp_sync
from .routing import route_token

__all__ = ["TOKENS", "Tail", "launch_router", "tail_layout"]

#: Tokens a pass (accumulators per thread).
TOKENS = 8
_MAX_WARPS = 32
#: Dynamic shared memory the routing tail may take (bytes): the default
#: limit of a block.
_TAIL_SHARED = 48 * 1024


class Tail(NamedTuple):
    """What the routing tail of :func:`launch_router` needs and writes.

    Attributes
    ----------
    num_experts : int
        ``E``: the first ``E`` logits of a row are the routed experts'.
    params : tuple
        ``numba_moe.routing._check_params`` output.
    bias : device float32 [E] (or [1] when there is no bias)
    ids, weights : device int32 / float32, flat ``[n_tok * K]``
    block_size : int
        Padding of the plan's aligned layout.
    plan : DevicePlan
        Buffers for at least ``n_tok * K`` pairs.
    done : device int32 [1]
        Zero before the first launch; each launch leaves it zero.
    """

    num_experts: int
    params: tuple
    bias: object
    ids: object
    weights: object
    block_size: int
    plan: DevicePlan
    done: object


@cuda.jit
def _router_kernel(w, x, n_tok, cols, lstride, logits, n_groups, xq, xa, done, n_exp,
                   top_k, gating, norm, bias, has_bias, n_group, topk_group, scale, ids,
                   weights, route_warps, bs, offsets, packed, pairs_by_token, active, meta,
                   sorted_ids, block_expert):
    """``logits[t * lstride + r] = w[r] . x[t]`` for ``r = blockIdx.x``; then
    the grid quantizes the ``n_groups`` activation groups of ``x``; then the
    last block routes and plans.

    Dynamic shared memory: ``route_warps * (2 * n_exp + n_group)``
    float32, ``n_tok * top_k + n_exp`` int32 (rounded up to 8 bytes), then
    ``n_exp + blockDim`` int64.
    """
    r = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    lane = tid & 31
    warp = tid >> 5
    part = cuda.shared.array((_MAX_WARPS, TOKENS), float32)
    acc = cuda.local.array(TOKENS, float32)
    wrow = int64(r) * cols
    for t0 in range(0, n_tok, TOKENS):
        nt = min(TOKENS, n_tok - t0)
        for t in range(TOKENS):
            acc[t] = float32(0)
        for c in range(4 * tid, cols, 4 * nthreads):
            w0, w1, w2, w3 = load4(w, wrow + c)
            for t in range(TOKENS):
                if t < nt:
                    x0, x1, x2, x3 = load4(x, int64(t0 + t) * cols + c)
                    acc[t] += (w0 * x0 + w1 * x1) + (w2 * x2 + w3 * x3)
        for t in range(TOKENS):
            v = seg_sum(acc[t], 32)
            if lane == 0:
                part[warp, t] = v
        cuda.syncthreads()
        if tid < nt:
            s = float32(0)
            for k in range(nthreads >> 5):
                s += part[k, tid]
            logits[int64(t0 + tid) * lstride + r] = s
        cuda.syncthreads()
    quantize_groups(x, cuda.grid(1), cuda.gridsize(1), n_groups, xq, xa)

    # the last block to get here routes: its count is taken after this
    # block's logits are fenced, so all others' are visible to it
    last = cuda.shared.array(1, int32)
    cuda.threadfence()
    cuda.syncthreads()
    if tid == 0:
        last[0] = cuda.atomic.add(done, 0, 1) == cuda.gridDim.x - 1
    cuda.syncthreads()
    if last[0] == 0:
        return
    if tid == 0:
        done[0] = 0
    cuda.threadfence()

    sh = cuda.shared.array(0, float32)
    sh32 = cuda.shared.array(0, int32)
    sh64 = cuda.shared.array(0, int64)
    per_warp = 2 * n_exp + n_group
    num_pairs = n_tok * top_k
    o32 = route_warps * per_warp
    pair_ids = sh32[o32:o32 + num_pairs]
    hist = sh32[o32 + num_pairs:o32 + num_pairs + n_exp]
    o64 = (o32 + num_pairs + n_exp + 1) // 2
    key = sh64[o64:o64 + n_exp]
    tmp64 = sh64[o64 + n_exp:o64 + n_exp + nthreads]
    # warps past route_warps idle here; the routing warps take every token
    # in turn (whole warps: every lane reaches the reductions)
    if warp < route_warps:
        for t in range(warp, n_tok, route_warps):
            my_id, wt = route_token(logits, t * lstride, lane, sh, warp * per_warp, n_exp, top_k,
                                    gating, norm, bias, has_bias, n_group, topk_group, scale)
            if lane < top_k:
                ids[t * top_k + lane] = my_id
                weights[t * top_k + lane] = wt
                pair_ids[t * top_k + lane] = my_id
            warp_sync()
    cuda.syncthreads()
    plan_block(pair_ids, num_pairs, top_k, n_exp, bs, hist, key, tmp64, offsets, packed,
               pairs_by_token, active, meta, sorted_ids, block_expert)


def tail_layout(n_tok: int, top_k: int, n_exp: int, n_group: int, threads: int):
    """``(route_warps, shared_bytes)`` of the routing tail, or None when even
    one routing warp's scratch and the plan's do not fit :data:`_TAIL_SHARED`
    (the forward then routes with the separate kernels).

    Routing warps: one a token, at most the block's, as many as fit.
    """
    plan32 = n_tok * top_k + n_exp
    plan64 = n_exp + threads
    per_warp = 2 * n_exp + n_group
    fit = (_TAIL_SHARED - 8 * plan64 - 4 * plan32 - 4) // (4 * per_warp)
    if fit < 1:
        return None
    rw = min(max(threads // 32, 1), n_tok, fit)
    return rw, (rw * per_warp + plan32 + 1) // 2 * 8 + plan64 * 8


def launch_router(w, x, n_tok, rows, cols, lstride, logits, threads, stream, tail: Tail,
                  codes=None) -> None:
    """Enqueue the router logits of ``n_tok`` tokens, their routing and plan
    (no checks, no allocation).

    Parameters
    ----------
    w : device float32, flat ``[rows * cols]``
    x : device float32, flat ``[n_tok * cols]`` (``cols`` a multiple of 4)
    lstride : int
        Row stride of ``logits`` (>= rows).
    logits : device float32, flat ``[n_tok * lstride]``
    threads : int
        Block size, a multiple of 32, at most 1024.
    tail : Tail
        Routing of the tokens on the first ``E`` logits of each row (as
        :func:`.routing.launch_topk`) and their plan (as
        :func:`.plan.launch_plan`); :func:`tail_layout` must not be None.
    codes : (xq, xa), optional
        Device buffers of :func:`.actquant.quantized_sizes` ``(n_tok * cols)``:
        also quantize ``x`` into them, as :func:`.actquant.launch_quantize`.
    """
    n_groups = 0
    xq = xa = logits
    if codes is not None:
        n_groups = n_tok * cols // GROUP
        xq, xa = codes
    top_k, norm, gating, bias, n_group, topk_group, scale = tail.params
    n_exp = tail.num_experts
    rw, shared = tail_layout(n_tok, top_k, n_exp, n_group, threads)
    pl = tail.plan
    _router_kernel[rows, threads, stream, shared](
        w, x, n_tok, cols, lstride, logits, n_groups, xq, xa, tail.done, n_exp, top_k,
        gating, norm, tail.bias, bias.shape[0] > 0, n_group, topk_group, scale, tail.ids,
        tail.weights, rw, tail.block_size, pl.offsets, pl.packed_token_idx, pl.pairs_by_token,
        pl.active, pl.meta, pl.sorted_ids, pl.block_expert)

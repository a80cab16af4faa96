"""Routing, plan and activation codes of a small batch in one block.

At decode sizes the top-k, the plan and the activation codes are a few
hundred values each; as three kernels (:mod:`.routing`, :mod:`.plan`,
:mod:`.actquant`) they cost three launches and a chain of
``syncthreads``-bound scans on 128 blocks.  Here one block does all of it:

1. warp ``w`` routes tokens ``w, w + warps, ...`` (:func:`.routing.route_token`),
   the ids kept in shared memory;
2. the block quantizes ``x`` into the GEMV's codes (:func:`.actquant.quantize_group`);
3. the block builds the plan of :mod:`.plan`: per-expert counts, three
   prefix sums, and each pair's rank among the earlier pairs of its expert
   (a count over the pairs before it: no atomics, deterministic).

Same outputs as the three kernels, for up to :data:`MAX_PAIRS` pairs and
:data:`MAX_EXPERTS` experts.
"""
from __future__ import annotations

from numba import cuda, float32, int32

from .actquant import quantize_group
from .plan import DevicePlan
from .primitives import block_exclusive_scan, warp_sync
from .routing import route_token

__all__ = ["MAX_PAIRS", "MAX_EXPERTS", "fits", "launch_route_plan"]

#: Most pairs (T * K) and experts the one-block kernel takes.
MAX_PAIRS = 512
MAX_EXPERTS = 256
_MAX_THREADS = 1024


def fits(num_pairs: int, num_experts: int) -> bool:
    """Whether :func:`launch_route_plan` covers this batch."""
    return num_pairs <= MAX_PAIRS and num_experts <= MAX_EXPERTS


@cuda.jit
def _route_plan_kernel(logits, lstride, n_tok, n_exp, top_k, gating, norm, bias, has_bias,
                       n_group, topk_group, scale, ids, weights, bs, offsets, packed,
                       pairs_by_token, active, meta, sorted_ids, block_expert,
                       x, n_groups, xq, xa):
    scratch = cuda.shared.array(0, float32)
    ids_s = cuda.shared.array(MAX_PAIRS, int32)
    hist = cuda.shared.array(MAX_EXPERTS, int32)
    off = cuda.shared.array(MAX_EXPERTS, int32)
    pad = cuda.shared.array(MAX_EXPERTS, int32)
    act = cuda.shared.array(MAX_EXPERTS, int32)
    tmp = cuda.shared.array(_MAX_THREADS, int32)
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    lane = tid & 31
    warp = tid >> 5
    warps = nthreads >> 5
    num_pairs = n_tok * top_k

    # warps past the last token route the last token again and write nothing
    for t0 in range(0, n_tok, warps):
        t = t0 + warp
        valid = t < n_tok
        row = (t if valid else n_tok - 1) * lstride
        my_id, w = route_token(logits, row, lane, scratch, warp * (2 * n_exp + n_group), n_exp,
                               top_k, gating, norm, bias, has_bias, n_group, topk_group, scale)
        if valid and lane < top_k:
            p = t * top_k + lane
            ids_s[p] = my_id
            ids[p] = my_id
            weights[p] = w
        warp_sync()

    for g in range(tid, n_groups, nthreads):
        quantize_group(x, g, xq, xa)

    for e in range(tid, n_exp, nthreads):
        hist[e] = 0
    cuda.syncthreads()
    for p in range(tid, num_pairs, nthreads):
        cuda.atomic.add(hist, ids_s[p], 1)
    cuda.syncthreads()
    for e in range(tid, n_exp, nthreads):
        h = hist[e]
        off[e] = h
        pad[e] = (h + bs - 1) // bs * bs
        act[e] = 1 if h > 0 else 0
    cuda.syncthreads()
    block_exclusive_scan(off, n_exp, tmp)
    n_padded = block_exclusive_scan(pad, n_exp, tmp)
    n_active = block_exclusive_scan(act, n_exp, tmp)
    for e in range(tid, n_exp, nthreads):
        offsets[e] = off[e]
        cnt = hist[e]
        if cnt > 0:
            active[act[e]] = e
            n_blk = (cnt + bs - 1) // bs
            for b in range(n_blk):
                block_expert[pad[e] // bs + b] = e
            for i in range(cnt, n_blk * bs):
                sorted_ids[pad[e] + i] = num_pairs
    if tid == 0:
        offsets[n_exp] = num_pairs
        meta[0] = n_active
        meta[1] = n_padded
    for p in range(tid, num_pairs, nthreads):
        e = ids_s[p]
        r = 0
        for q in range(p):
            if ids_s[q] == e:
                r += 1
        slot = off[e] + r
        packed[slot] = p // top_k
        pairs_by_token[p] = slot
        sorted_ids[pad[e] + r] = p


def launch_route_plan(logits, lstride, n_tok, n_exp, params, bias_dev, ids, weights,
                      block_size, plan: DevicePlan, x, n_groups, xq, xa, stream) -> None:
    """Route ``n_tok`` tokens, build their plan and quantize ``n_groups``
    activation groups of ``x`` in one launch (no checks, no allocation).

    Arguments as :func:`.routing.launch_topk`, :func:`.plan.launch_plan`
    and :func:`.actquant.launch_quantize`; the batch must :func:`fits`.
    """
    from ..config import CUDA_LAUNCH

    top_k, norm, gating, bias, n_group, topk_group, scale = params
    threads = min(CUDA_LAUNCH.route_threads, _MAX_THREADS, max(128, 32 * n_tok))
    shared = (threads // 32) * (2 * n_exp + n_group) * 4
    _route_plan_kernel[1, threads, stream, shared](
        logits, lstride, n_tok, n_exp, top_k, gating, norm, bias_dev, bias.shape[0] > 0,
        n_group, topk_group, scale, ids, weights, block_size, plan.offsets,
        plan.packed_token_idx, plan.pairs_by_token, plan.active, plan.meta, plan.sorted_ids,
        plan.block_expert, x, n_groups, xq, xa)

"""The CPU MoE forward: route -> plan -> gather -> gemm1 -> act -> gemm2 -> combine.

:func:`moe_forward` is what ``MoELayer.__call__(x)`` runs on the CPU:

1. **route**: router logits ``x @ router.T`` (a Numba kernel, see
   :mod:`numba_moe.cpu.logits`) and top-k (:func:`numba_moe.route_into`);
2. **plan**: counting sort of the pairs by expert (:class:`~numba_moe.BucketPlan`)
   and the balanced work lists of both projections;
3. **gather**: each token row quantized once (12-bit codes per 256 values,
   :mod:`numba_moe.cpu.actquant`); the kernels read rows through
   ``packed_token_idx``, so no row is copied per pair;
4. **gemm1**: gate and up of every active expert over its tokens, SiLU(gate)
   * up in the epilogue (:func:`numba_moe.cpu.gemm.grouped_gate_up`);
5. **act**: the intermediate rows quantized for the down projection;
6. **gemm2**: down projection per slot;
7. **combine**: ``out[t] = sum_k w[t,k] * y[pairs_by_token[t*K+k]]`` (+ the
   shared expert), assigned, never accumulated into stale memory.

The shared expert (qwen2moe, deepseek2) runs through the same kernels as a
one-expert set that every token uses.  All scratch lives in the layer's
:class:`~numba_moe.cpu.workspace.Workspace`.
"""
from __future__ import annotations

import numba
import numpy as np

from ..profile import phase
from ..routing import route_into
from ..threading_guard import parallel_launch
from .actquant import quantize_rows_into
from .combine import SHARED_GATED, SHARED_NONE, SHARED_PLAIN, combine_into
from .gemm import _DECODE_WEIGHT, QT_DENSE, QT_Q4_K, TILE_ROWS, _down_kernel, _gate_up_kernel
from .logits import router_logits_into
from .schedule import schedule_items
from .simd import q4_k_order_into, simd_flag
from .workspace import workspace_for

__all__ = ["moe_forward", "touched_expert_bytes"]


def touched_expert_bytes(layer, expert_ids) -> int:
    """Bytes of expert blocks a forward with this routing must read.

    Parameters
    ----------
    layer : MoELayer
    expert_ids : array of int, shape (T, K)
        The routing (``layer.route(x).expert_ids``).

    Returns
    -------
    int
        ``(distinct experts) * (gate + up + down bytes of one expert)``, plus
        the whole shared expert when the layer has one.  Divided by a time
        it gives the effective bandwidth; divided by the machine's streaming
        bandwidth, the memory-bound floor of one forward.
    """
    distinct = int(np.unique(np.asarray(expert_ids)).size)
    total = distinct * layer.expert_bytes()
    if layer.shared is not None:
        total += sum(t.nbytes for t in (layer.shared.gate, layer.shared.up, layer.shared.down))
    return total


def _schedule(branch, offsets, nbins):
    schedule_items(offsets, branch.inter, TILE_ROWS, _DECODE_WEIGHT, nbins, branch.items1,
                   branch.bounds1)
    schedule_items(offsets, branch.hidden, TILE_ROWS, _DECODE_WEIGHT, nbins, branch.items2,
                   branch.bounds2)


def _gemm1(ws, branch, offsets, tokens, x, simd):
    g, u = branch.gate, branch.up
    xq, xd, xmb = ws.xq
    _gate_up_kernel(branch.items1, branch.bounds1, offsets, tokens, (g.qt, u.qt), (g.q, u.q),
                    (g.q32, u.q32), (g.f, u.f), (g.row0, u.row0), g.cols, xq, xd, xmb, ws.xp, x,
                    branch.h, ws.w16, ws.dsc, ws.dmins, x.shape[0] == 1, simd)


def _act(branch, slots, simd):
    if branch.down.qt != QT_DENSE and slots:
        quantize_rows_into(branch.h, slots, *branch.hq)
        if simd is not None and branch.down.qt == QT_Q4_K:
            q4_k_order_into(branch.hq[0], slots, branch.hp)


def _gemm2(ws, branch, offsets, single_token, simd):
    d = branch.down
    hq, hd, hmb = branch.hq
    _down_kernel(branch.items2, branch.bounds2, offsets, d.qt, d.q, d.q32, d.f, d.row0, d.cols,
                 hq, hd, hmb, branch.hp, branch.h, branch.y, ws.w16, ws.dsc, ws.dmins,
                 single_token, simd)


def moe_forward(layer, x: np.ndarray) -> np.ndarray:
    """Run one MoE layer on the CPU, straight from its compressed blocks.

    Parameters
    ----------
    layer : MoELayer
    x : ndarray of float32, shape (T, H), C-contiguous

    Returns
    -------
    ndarray of float32, shape (T, H)
        A new array (the only allocation of a warm call).

    Notes
    -----
    Native block types (Q4_K, Q5_K, Q6_K, Q8_0) are multiplied as integers
    against activations quantized to 12 bits per 256-value block: results
    match a float64 evaluation to about 1e-3 of the output magnitude.
    Other types go through float32 ``ExpertTensor.dense()`` rows.  NaN or
    Inf in a token row make that token's output NaN (Inf does not survive
    the quantization as Inf).
    """
    x = layer.check_input(x)
    T = x.shape[0]
    K = layer.top_k
    nbins = numba.get_num_threads()
    simd = simd_flag()
    ws = workspace_for(layer)
    out = np.empty((T, layer.hidden_size), dtype=np.float32)
    with ws.lock, parallel_launch():
        ws.ensure(T, nbins)
        routed, shared = ws.routed, ws.shared
        with phase("route"):
            logits = router_logits_into(x, layer.router, ws.logits[:T])
            route_into(logits, ws.ids[:T], ws.weights[:T], ws.route_scratch, K,
                       norm_topk_prob=layer.norm_topk_prob, gating=layer.gating,
                       selection_bias=layer.selection_bias, n_group=layer.n_group,
                       topk_group=layer.topk_group, scale=layer.routed_scale)
        with phase("plan"):
            plan = ws.plan.rebuild(ws.ids[:T], ws.weights[:T])
            _schedule(routed, plan.expert_offsets, nbins)
            if shared is not None:
                ws.shared_offsets[1] = T
                _schedule(shared, ws.shared_offsets, nbins)
        with phase("gather"):
            if ws.any_native_in:
                quantize_rows_into(x, T, *ws.xq)
                if simd is not None and ws.any_q4_k_in:
                    q4_k_order_into(ws.xq[0], T, ws.xp)
        with phase("gemm1"):
            _gemm1(ws, routed, plan.expert_offsets, plan.packed_token_idx, x, simd)
            if shared is not None:
                _gemm1(ws, shared, ws.shared_offsets, ws.shared_tokens, x, simd)
        with phase("act"):
            _act(routed, T * K, simd)
            if shared is not None:
                _act(shared, T, simd)
        with phase("gemm2"):
            _gemm2(ws, routed, plan.expert_offsets, T == 1, simd)
            if shared is not None:
                _gemm2(ws, shared, ws.shared_offsets, T == 1, simd)
        with phase("combine"):
            if shared is None:
                mode, ys, gate_inp = SHARED_NONE, routed.y[:0], x[0, :0]
            elif ws.shared_gate is None:
                mode, ys, gate_inp = SHARED_PLAIN, shared.y, x[0, :0]
            else:
                mode, ys, gate_inp = SHARED_GATED, shared.y, ws.shared_gate
            combine_into(routed.y, plan.pairs_by_token, plan.pair_weights, K, mode, ys, gate_inp,
                         x, out)
    return out

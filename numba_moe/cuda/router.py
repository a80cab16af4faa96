"""Router logits of a small batch: one block per router row.

The router matrix is small (E x H float32, 1 MiB for Qwen3-30B-A3B) and a
decode step has few tokens, so a GEMV that gives each row to a few lanes
leaves most of the GPU idle and waits on one load after another.  Here
block ``r`` computes row ``r``'s logits for every token: its threads split
the row's columns (one 16-byte load each per step), multiply them with
:data:`TOKENS` tokens at a time, and reduce over the block.  Every row is
read once per pass of tokens; the activations come from L2.

The same launch also writes the 16-bit codes of ``x`` (:mod:`.actquant`)
when the experts' GEMV needs them: one launch less in a decode step.  Blocks
of their own (past the router's rows) do that, so that its loads run beside
the logits' instead of after them in every block (H100, Qwen3-30B-A3B
router, T=1: 4.5 -> 3.2 us).
"""
from __future__ import annotations

from numba import cuda, float32, int64

from .actquant import GROUP, quantize_groups
from .primitives import load4, seg_sum

__all__ = ["TOKENS", "launch_router"]

#: Tokens a pass (accumulators per thread).
TOKENS = 8
_MAX_WARPS = 32


@cuda.jit
def _router_kernel(w, x, n_tok, rows, cols, lstride, logits, n_groups, xq, xa):
    """``logits[t * lstride + r] = w[r] . x[t]`` for ``r = blockIdx.x <
    rows``; the blocks past ``rows`` quantize the ``n_groups`` activation
    groups of ``x``."""
    r = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    if r >= rows:
        quantize_groups(x, (r - rows) * nthreads + tid, (cuda.gridDim.x - rows) * nthreads,
                        n_groups, xq, xa)
        return
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


def launch_router(w, x, n_tok, rows, cols, lstride, logits, threads, stream,
                  codes=None) -> None:
    """Enqueue the router logits of ``n_tok`` tokens (no checks, no allocation).

    Parameters
    ----------
    w : device float32, flat ``[rows * cols]``
    x : device float32, flat ``[n_tok * cols]`` (``cols`` a multiple of 4)
    lstride : int
        Row stride of ``logits`` (>= rows).
    logits : device float32, flat ``[n_tok * lstride]``
    threads : int
        Block size, a multiple of 32, at most 1024.
    codes : (xq, xa), optional
        Device buffers of :func:`.actquant.quantized_sizes` ``(n_tok * cols)``:
        also quantize ``x`` into them, as :func:`.actquant.launch_quantize`
        (in ``n_tok * cols / 16 / threads`` more blocks, a group a thread).
    """
    if codes is None:
        # no groups to quantize: the code buffers are never touched
        _router_kernel[rows, threads, stream](w, x, n_tok, rows, cols, lstride, logits, 0,
                                              logits, logits)
        return
    n_groups = n_tok * cols // GROUP
    _router_kernel[rows + -(-n_groups // threads), threads, stream](
        w, x, n_tok, rows, cols, lstride, logits, n_groups, *codes)

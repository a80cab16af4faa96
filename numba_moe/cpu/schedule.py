"""Split a grouped projection into work items and balance them over threads.

A work item is ``(expert, first row, end row)``: a tile of an active
expert's output rows, computed for all of that expert's tokens (so each
weight block is decoded once per forward).  Items are listed in expert
order and cut into ``nbins`` contiguous runs of near-equal estimated cost;
the parallel kernels run ``prange(nbins)`` with one run per iteration, so
no two threads ever write the same output element or scratch row (no races,
no atomics).  Contiguous runs keep one expert's tiles on one thread, which
keeps that expert's gathered activations hot in that thread's cache.

Cost of an item: ``rows * (decode_weight + tokens)`` -- one row decode is
worth ``decode_weight`` token dot products.
"""
from numba import njit

__all__ = ["schedule_items", "max_items"]


def max_items(num_experts: int, rows: int, tile: int) -> int:
    """Upper bound on the items of one projection (every expert active)."""
    return num_experts * ((rows + tile - 1) // tile)


@njit(cache=True)
def schedule_items(expert_offsets, rows, tile, decode_weight, nbins, items, bounds):
    """Fill ``items`` and ``bounds`` for the active experts of a plan.

    Parameters
    ----------
    expert_offsets : int64 [E+1]
        Slot ranges of the experts (``BucketPlan.expert_offsets``).
    rows : int
        Output rows of the projection.
    tile : int
        Rows per item.
    decode_weight : int
        Cost of decoding one row, in token dot products.
    nbins : int
        Number of runs (the thread count).
    items : int64 [>= max_items, 3]
        Receives ``(expert, r0, r1)`` per item.
    bounds : int64 [nbins + 1]
        Receives the runs: bin ``k`` owns items ``bounds[k] .. bounds[k+1]-1``.

    Returns
    -------
    int
        Number of items.
    """
    n = 0
    total = 0
    num_experts = expert_offsets.shape[0] - 1
    for e in range(num_experts):
        cnt = expert_offsets[e + 1] - expert_offsets[e]
        if cnt == 0:
            continue
        for r0 in range(0, rows, tile):
            r1 = min(r0 + tile, rows)
            items[n, 0] = e
            items[n, 1] = r0
            items[n, 2] = r1
            total += (r1 - r0) * (decode_weight + cnt)
            n += 1
    # Bin k starts at the first item whose cost midpoint reaches k/nbins of
    # the total: every bin is within one item's cost of total / nbins.
    bounds[0] = 0
    k = 1
    acc = 0
    for i in range(n):
        e = items[i, 0]
        c = (items[i, 2] - items[i, 1]) * (decode_weight + expert_offsets[e + 1] - expert_offsets[e])
        while k < nbins and (2 * acc + c) * nbins >= 2 * k * total:
            bounds[k] = i
            k += 1
        acc += c
    while k <= nbins:
        bounds[k] = n
        k += 1
    return n

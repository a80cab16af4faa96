"""Dispatch plan on the device: BucketPlan and moe_align_block_size in one kernel.

Same result as :class:`numba_moe.BucketPlan` and
:func:`numba_moe.moe_align_block_size` (SPEC section 5), deterministic:
within an expert, pairs keep ascending pair index ``p = t * K + k``.

One kernel, one block per expert.  Every block first counts all pairs per
expert in shared memory (the counts do not depend on the order of the
atomic adds), scans the counts, then places the pairs of *its* expert with
a block-wide prefix sum over ``p``: slot = the expert's offset + the number
of earlier pairs of that expert.  No global synchronisation, no atomic slot
grabbing.

Outputs (device int32):

* ``offsets`` [E+1]: slot ranges (BucketPlan ``expert_offsets``);
* ``packed_token_idx`` [P]: token of each slot; ``pairs_by_token`` [P]: slot of each pair;
* ``active`` [E]: experts with pairs, ascending, ``meta[0]`` of them;
* ``sorted_ids`` [>= P + E * (bs - 1)], ``block_expert`` [...]: vLLM's
  padded layout with sentinel ``P``, ``meta[1]`` = ``num_tokens_post_padded``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import cuda, int32, int64

from ..errors import MoEError
from .primitives import SIMULATOR, block_exclusive_scan

__all__ = ["DevicePlan", "plan_capacity", "empty_plan", "empty_plan_sizes", "launch_plan",
           "plan_device", "check_plan_size", "PAIRS_PER_THREAD", "PLAN_MAX_EXPERTS",
           "PLAN_MAX_SLOTS"]

#: Consecutive pairs a thread tests per placement round.
PAIRS_PER_THREAD = 4


class DevicePlan(NamedTuple):
    """Device buffers of a plan (see the module docstring); sized for a capacity."""

    offsets: object
    packed_token_idx: object
    pairs_by_token: object
    active: object
    meta: object
    sorted_ids: object
    block_expert: object


def plan_capacity(num_pairs: int, num_experts: int, block_size: int):
    """``(sorted_ids length, block_expert length)`` that fit any routing of
    ``num_pairs`` pairs."""
    n = num_pairs + num_experts * (block_size - 1)
    return n, -(-n // block_size)


def empty_plan_sizes(num_pairs: int, num_experts: int, block_size: int):
    """Entries of each :class:`DevicePlan` buffer for up to ``num_pairs`` pairs."""
    n_sorted, n_blocks = plan_capacity(num_pairs, num_experts, block_size)
    return (num_experts + 1, max(num_pairs, 1), max(num_pairs, 1), num_experts, 2,
            max(n_sorted, 1), max(n_blocks, 1))


def empty_plan(num_pairs: int, num_experts: int, block_size: int, stream=0) -> DevicePlan:
    """Allocate a :class:`DevicePlan` for up to ``num_pairs`` pairs."""
    return DevicePlan(*(cuda.device_array(n, np.int32, stream=stream)
                        for n in empty_plan_sizes(num_pairs, num_experts, block_size)))


# One scan serves the three prefix sums a block needs, packed in an int64:
# bits 0..10 "has pairs" (rank among active experts), 11..36 pair count
# (first slot), 37..62 padded count (first aligned slot); the fields cannot
# carry into each other below these limits (checked by the callers).
_ACT_MASK = (1 << 11) - 1
_OFF_SHIFT = 11
_PAD_SHIFT = 37
_FIELD = (1 << 26) - 1
#: Most experts the device plan takes.
PLAN_MAX_EXPERTS = _ACT_MASK
#: Most aligned slots (``num_pairs + num_experts * (block_size - 1)``) it takes.
PLAN_MAX_SLOTS = _FIELD


def check_plan_size(num_pairs: int, num_experts: int, block_size: int) -> None:
    """Raise :class:`~numba_moe.errors.MoEError` when a plan of this size would
    overflow the packed scan of the plan kernel."""
    if num_experts > PLAN_MAX_EXPERTS:
        raise MoEError(f"num_experts={num_experts}: the CUDA plan takes at most "
                       f"{PLAN_MAX_EXPERTS} experts")
    if plan_capacity(num_pairs, num_experts, block_size)[0] > PLAN_MAX_SLOTS:
        raise MoEError(f"{num_pairs} (token, expert) pairs exceed the CUDA plan's "
                       f"{PLAN_MAX_SLOTS} slots: split the batch")


@cuda.jit
def _plan_kernel(ids, num_pairs, top_k, n_exp, bs, offsets, packed, pairs_by_token, active,
                 meta, sorted_ids, block_expert):
    """Block ``e`` places expert e's pairs; block 0 also writes ``offsets``
    and ``meta``.  Dynamic shared memory: ``n_exp + 2 * blockDim`` int32
    (rounded up to 8 bytes), then ``n_exp + blockDim`` int64."""
    sh = cuda.shared.array(0, int32)
    sh64 = cuda.shared.array(0, int64)
    nt = cuda.blockDim.x
    tid = cuda.threadIdx.x
    hist = sh[0:n_exp]
    flags = sh[n_exp:n_exp + nt]
    tmp = sh[n_exp + nt:n_exp + 2 * nt]
    o64 = (n_exp + 2 * nt + 1) // 2
    key = sh64[o64:o64 + n_exp]
    tmp64 = sh64[o64 + n_exp:o64 + n_exp + nt]
    for i in range(tid, n_exp, nt):
        hist[i] = 0
    cuda.syncthreads()
    # the counts do not depend on the order of the atomic adds
    for p in range(tid, num_pairs, nt):
        cuda.atomic.add(hist, ids[p], 1)
    cuda.syncthreads()
    for i in range(tid, n_exp, nt):
        h = int64(hist[i])
        key[i] = (min(h, 1) | (h << _OFF_SHIFT)
                  | (((h + bs - 1) // bs * bs) << _PAD_SHIFT))
    cuda.syncthreads()
    total = block_exclusive_scan(key, n_exp, tmp64)

    e = cuda.blockIdx.x
    if e == 0:
        for i in range(tid, n_exp, nt):
            offsets[i] = int32((key[i] >> _OFF_SHIFT) & _FIELD)
        if tid == 0:
            offsets[n_exp] = num_pairs
            meta[0] = int32(total & _ACT_MASK)
            meta[1] = int32(total >> _PAD_SHIFT)
    cnt = hist[e]
    if cnt == 0:
        return
    mine = key[e]
    my_off = int32((mine >> _OFF_SHIFT) & _FIELD)
    my_pad = int32(mine >> _PAD_SHIFT)
    if tid == 0:
        active[mine & _ACT_MASK] = e
    n_blk = (cnt + bs - 1) // bs
    for b in range(tid, n_blk, nt):
        block_expert[my_pad // bs + b] = e
    for i in range(cnt + tid, n_blk * bs, nt):
        sorted_ids[my_pad + i] = num_pairs
    placed = 0
    base = 0
    while placed < cnt:
        p0 = base + tid * PAIRS_PER_THREAD
        f = 0
        for v in range(PAIRS_PER_THREAD):
            p = p0 + v
            if p < num_pairs and ids[p] == e:
                f += 1
        flags[tid] = f
        chunk = block_exclusive_scan(flags, nt, tmp)
        r = placed + flags[tid]
        for v in range(PAIRS_PER_THREAD):
            p = p0 + v
            if p < num_pairs and ids[p] == e:
                slot = my_off + r
                packed[slot] = p // top_k
                pairs_by_token[p] = slot
                sorted_ids[my_pad + r] = p
                r += 1
        placed += chunk
        base += nt * PAIRS_PER_THREAD


def launch_plan(ids, num_pairs, top_k, num_experts, block_size, plan: DevicePlan,
                threads, stream):
    """Launch the plan kernel on device buffers (no checks, no allocation).

    ``ids`` is device int32 flat ``[num_pairs]`` with every id in range.
    """
    if not SIMULATOR:
        # the block scan works on whole warps
        threads = max(32, threads // 32 * 32)
    shared = (num_experts + 2 * threads + 1) // 2 * 8 + (num_experts + threads) * 8
    _plan_kernel[num_experts, threads, stream, shared](
        ids, num_pairs, top_k, num_experts, block_size, plan.offsets, plan.packed_token_idx,
        plan.pairs_by_token, plan.active, plan.meta, plan.sorted_ids, plan.block_expert)


def plan_device(expert_ids, num_experts: int, block_size: int, stream=0,
                out: DevicePlan = None) -> DevicePlan:
    """Build the plan of a routing on the GPU.

    Parameters
    ----------
    expert_ids : int32 (T, K), numpy or ``__cuda_array_interface__``
        Ids in ``[0, num_experts)`` (checked here: a numpy input on the host,
        a device input after one copy to the host, as this is the test-facing
        wrapper; the forward pass routes on the device and never checks).
    num_experts : int
    block_size : int
        Padding of the aligned layout (any of ``config.BLOCK_SIZES``).
    stream : numba stream, optional
    out : DevicePlan, optional
        Buffers from :func:`empty_plan` for at least T*K pairs (else allocated).

    Returns
    -------
    DevicePlan
        Device arrays; ``sorted_ids[:meta[1]]`` and
        ``block_expert[:meta[1] // block_size]`` hold the aligned layout.
    """
    from ..config import BLOCK_SIZES, CUDA_LAUNCH
    from ..plan import _check_ids
    from .arrays import as_device_2d, device_view, is_device_array

    host = device_view(expert_ids).copy_to_host() if is_device_array(expert_ids) \
        else expert_ids
    _check_ids(host, num_experts, (2,))
    if block_size not in BLOCK_SIZES:
        raise MoEError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    d_ids = as_device_2d("expert_ids", expert_ids, np.int32, stream)
    n_tok, top_k = d_ids.shape
    num_pairs = n_tok * top_k
    check_plan_size(num_pairs, num_experts, block_size)
    plan = empty_plan(num_pairs, num_experts, block_size, stream) if out is None else out
    need = empty_plan_sizes(num_pairs, num_experts, block_size)
    if any(len(a) < n for a, n in zip(plan, need)):
        raise MoEError(f"out: plan buffers must hold at least {need} entries")
    launch_plan(d_ids.reshape(num_pairs), num_pairs, top_k, num_experts, block_size, plan,
                CUDA_LAUNCH.scan_threads, stream)
    return plan

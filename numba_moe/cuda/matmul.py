"""Launching the grouped expert GEMMs of :mod:`.gemm`, and their test-facing wrapper."""
from __future__ import annotations

import numpy as np
from numba import cuda

from ..config import CUDA_LAUNCH
from ..errors import MoEError
from ..experts import ExpertTensor
from .actquant import launch_quantize, quantized_sizes
from .actsplit import launch_split, split_sizes
from .gemm import MAX_TOKENS_PER_PASS, gemv_kernel, gemv_layout, tiled_kernel, tiled_layout
from .gemm import tokens_per_pass as tokens_per_pass_for
from .hmma import TYPES as HMMA_TYPES
from .hmma import hmma_kernel, hmma_layout
from .mma import mma_kernel, mma_layout, row_blocks_fast
from .plan import DevicePlan, plan_capacity, plan_device
from .primitives import SIMULATOR
from .qgemv import qgemv_kernel, uses_pairs
from .qgemv import shared_bytes as qgemv_shared_bytes
from .weights import DeviceWeights, upload_gate_up, upload_weights

__all__ = ["launch_expert_gemm", "expert_gemm", "uses_codes", "uses_split", "integer_kernels",
           "down_parts"]


def integer_kernels():
    """``(gemv, mma)``: whether this device runs the integer GEMV (``dp4a``,
    compute capability 6.1+) and the tensor-core kernel (integer
    ``mma.m16n8k16``, 8.0+).  Without them quantized weights take the float
    kernels of :mod:`.gemm`.  Always both under the simulator (it runs their
    twins)."""
    if SIMULATOR:
        return True, True
    cc = tuple(cuda.get_current_device().compute_capability)
    return cc >= (6, 1), cc >= (8, 0)


def uses_split(w: DeviceWeights, small: bool) -> bool:
    """Whether :func:`launch_expert_gemm` reads the activations of ``w`` split
    into fp16 pairs (:mod:`.actsplit`): Q4_K / Q6_K weights on the tiled
    path, where the device has tensor cores (:mod:`.hmma`)."""
    return not small and w.qtype in HMMA_TYPES and integer_kernels()[1]


def uses_codes(w: DeviceWeights, small: bool) -> bool:
    """Whether :func:`launch_expert_gemm` reads the activations of ``w`` as
    16-bit codes (:mod:`.actquant`): quantized weights on the integer GEMV
    (``small``) or the integer tensor-core kernel, where the device has them."""
    return (w.info.codes4 is not None and integer_kernels()[0 if small else 1]
            and not uses_split(w, small))


def down_parts(tile_m: int) -> int:
    """Parts the fp16 kernel's down projection takes a plan block of ``tile_m``
    tokens in: ``tile_m / CUDA_LAUNCH.hmma_down_tile_m`` when that is a power
    of two above 1 (each part a multiple of 8 tokens), else 1."""
    d = CUDA_LAUNCH.hmma_down_tile_m
    parts = tile_m // d if d >= 8 and d % 8 == 0 and tile_m % d == 0 else 1
    return parts if parts & (parts - 1) == 0 else 1


def launch_expert_gemm(w: DeviceWeights, v, x, plan: DevicePlan, expert_slots: int,
                       m_blocks: int, num_pairs: int, top_k: int, out, small: bool,
                       stream, token_splits: int = 1, nt: int = 1, codes=None,
                       tile_m: int = None, k_splits: int = 1, by_pair: bool = False,
                       quantize: bool = False) -> None:
    """Enqueue one grouped GEMM (no checks, no allocation).

    Parameters
    ----------
    w, v : DeviceWeights
        Gate (or the only) weights, and the up weights for ``gate_up`` mode
        (``v`` None: plain mode).
    x : device float32, flat
        Token rows (gate_up; gathered through the plan) or slot rows (plain).
    plan : DevicePlan
    expert_slots : int
        Bound on the active experts (GEMV grid).
    m_blocks : int
        Bound on the padded row blocks (tiled grid).
    num_pairs, top_k : int
        P (pair indices >= P are padding; slots clamp to P) and K.
    out : device float32, flat ``[P, rows]``
    small : bool
        GEMV kernel (True) or tiled kernel (False).
    token_splits : int
        GEMV only: blocks sharing one expert's token list (``gridDim.z``).
    nt : int
        GEMV only: tokens per pass (1 to ``MAX_TOKENS_PER_PASS``).
    codes : tuple of device arrays, optional
        ``x`` as codes ``(xq, xa)`` (:func:`~numba_moe.cuda.actquant.launch_quantize`)
        when :func:`uses_codes`, split ``(hx, hsum, xs)``
        (:func:`~numba_moe.cuda.actsplit.launch_split`) when :func:`uses_split`;
        else unused.
    tile_m : int, optional
        Tiled kernels: the plan's block size (default ``CUDA_LAUNCH.tile_m``).
    k_splits : int
        SIMT tiled kernel, plain mode: column ranges summed by separate
        blocks into planes ``out[z * P * rows ...]`` (``out`` that large),
        which the caller adds.
    by_pair : bool
        GEMV only (``nt`` = 1): a slot per pair, ``plan.active`` the
        routing's ids (``expert_slots`` = P; :func:`~numba_moe.cuda.gemm.gemv_head`).
    quantize : bool
        ``by_pair``, plain mode, integer GEMV: the kernel reads ``x`` and
        quantizes each row itself (``codes`` unused).
    """
    gate_up = v is not None
    tile_m = tile_m or CUDA_LAUNCH.tile_m
    vplanes = v.planes if gate_up else w.planes
    codes_path = uses_codes(w, small)
    if small:
        # a lane of the integer GEMV in pair mode walks units of two chunks
        pairs = codes_path and uses_pairs(w.info)
        segw, warps, row_blocks, tile, shared = gemv_layout(
            w.rows, w.chunks, gate_up, expert_slots, CUDA_LAUNCH.gemv_warps, nt,
            CUDA_LAUNCH.gemv_shared_bytes, token_splits, pairs)
    # bytes of input rows a tiled tensor-core launch reads: fp16 pairs, or
    # 16-bit codes (their scales left out)
    act_bytes = ((num_pairs // top_k if gate_up else num_pairs) * w.cols
                 * (4 if uses_split(w, small) else 2))
    if uses_split(w, small):
        parts = 1 if gate_up else down_parts(tile_m)
        kern = hmma_kernel(w.qtype, gate_up, tile_m // parts, parts.bit_length() - 1)
        threads, n_blocks = hmma_layout(w.rows, tile_m // parts, gate_up)
        kern[m_blocks * parts * n_blocks, threads, stream](
            *w.planes, *vplanes, w.nb, w.cols // 16, w.rows, *codes, w.cols, num_pairs,
            top_k, plan.sorted_ids, plan.block_expert, plan.meta, plan.pairs_by_token, out,
            row_blocks_fast(act_bytes))
    elif codes_path and small:
        kern = qgemv_kernel(w.info, gate_up, nt, by_pair, quantize)
        xq, xa = (x, x) if quantize else codes
        kern[(expert_slots, row_blocks, token_splits), 32 * warps, stream,
             qgemv_shared_bytes(quantize, w.chunks)](
            *w.planes, *vplanes, w.nb, w.chunks, w.rows, segw, xq, xa, num_pairs,
            plan.active, plan.meta, plan.offsets, plan.packed_token_idx, out)
    elif codes_path:
        kern = mma_kernel(w.info, gate_up, tile_m)
        threads, n_blocks = mma_layout(w.rows)
        kern[m_blocks * n_blocks, threads, stream](
            *w.planes, *vplanes, w.nb, 2 * w.chunks, w.rows, *codes, 2 * w.chunks, num_pairs,
            top_k, plan.sorted_ids, plan.block_expert, plan.meta, plan.pairs_by_token, out,
            row_blocks_fast(act_bytes))
    elif small:
        kern = gemv_kernel(w.info, gate_up, nt, by_pair)
        kern[(expert_slots, row_blocks, token_splits), 32 * warps, stream, shared](
            *w.planes, *vplanes, w.nb, w.chunks, w.rows, segw, segw.bit_length() - 1, tile, x,
            num_pairs,
            plan.active, plan.meta, plan.offsets, plan.packed_token_idx, out)
    else:
        bm, bn = tile_m, CUDA_LAUNCH.tile_n
        kern = tiled_kernel(w.info, gate_up, bm, bn)
        threads, n_blocks, shared = tiled_layout(w.rows, bm, bn, gate_up)
        kern[(m_blocks, n_blocks, k_splits), threads, stream, shared](
            *w.planes, *vplanes, w.nb, w.chunks, w.rows, x, num_pairs, top_k,
            plan.sorted_ids, plan.block_expert, plan.meta, plan.pairs_by_token, out,
            num_pairs * w.rows)


def expert_gemm(weights, x, expert_ids, up=None, kernel: str = "gemv", stream=0, out=None,
                tokens_per_pass: int = None):
    """Grouped expert GEMM on the GPU, by slot of the routing's plan.

    Parameters
    ----------
    weights : ExpertTensor or DeviceWeights, shape (E, R, C)
        Gate weights in ``gate_up`` mode, else the only weights.
    x : float32, numpy or device
        ``gate_up`` mode: token rows (T, C).  Plain mode: slot rows (T*K, C).
    expert_ids : int32 (T, K), numpy
        The routing; slots follow :class:`numba_moe.BucketPlan`.
    up : ExpertTensor or DeviceWeights, optional
        Up weights: the result is ``silu(gate . x) * (up . x)``.
    kernel : {'gemv', 'tiled'}
    stream : numba stream, optional
    out : device float32 (T*K, R), optional
        Destination (else allocated).
    tokens_per_pass : int, optional
        GEMV tokens per pass, 1 to ``MAX_TOKENS_PER_PASS`` (else picked from
        the mean tokens per expert, as the forward does).

    Returns
    -------
    device float32 (T*K, R)
        Row ``slot`` holds the product for the pair in that slot.

    Raises
    ------
    MoEError
        Mismatched shapes, bad ids, unknown ``kernel``.
    """
    from .arrays import as_device_2d, check_out

    if kernel not in ("gemv", "tiled"):
        raise MoEError(f"kernel must be 'gemv' or 'tiled', got {kernel!r}")
    if tokens_per_pass is not None and tokens_per_pass not in range(1, MAX_TOKENS_PER_PASS + 1):
        raise MoEError(f"tokens_per_pass must be in [1, {MAX_TOKENS_PER_PASS}], "
                       f"got {tokens_per_pass!r}")
    if isinstance(weights, ExpertTensor) and isinstance(up, ExpertTensor):
        w, v = upload_gate_up(weights, up, stream)
    else:
        w = upload_weights(weights, stream) if isinstance(weights, ExpertTensor) else weights
        v = upload_weights(up, stream) if isinstance(up, ExpertTensor) else up
    if not isinstance(w, DeviceWeights) or (v is not None and not isinstance(v, DeviceWeights)):
        raise MoEError("weights and up must be ExpertTensor or DeviceWeights")
    if v is not None and (v.shape, v.qtype) != (w.shape, w.qtype):
        raise MoEError(f"up {v.name} must match gate {w.name} in shape and type")
    ids = np.asarray(expert_ids)
    if ids.ndim != 2:
        raise MoEError(f"expert_ids must be 2-D (T, K), got shape {ids.shape}")
    n_tok, top_k = ids.shape
    p = n_tok * top_k
    d_x = as_device_2d("x", x, np.float32, stream)
    want = (n_tok if v is not None else p, w.cols)
    if tuple(d_x.shape) != want:
        raise MoEError(f"x must have shape {want}, got {tuple(d_x.shape)}")
    plan = plan_device(ids, w.num_experts, CUDA_LAUNCH.tile_m, stream)
    if out is None:
        out = cuda.device_array((p, w.rows), np.float32, stream=stream)
    else:
        out = check_out("out", out, np.float32, (p, w.rows))
    if p:
        m_blocks = plan_capacity(p, w.num_experts, CUDA_LAUNCH.tile_m)[1]
        nt = tokens_per_pass or tokens_per_pass_for(p / min(w.num_experts, p))
        flat = d_x.reshape(d_x.size)
        codes = None
        if uses_codes(w, kernel == "gemv"):
            nq, na = quantized_sizes(d_x.size)
            codes = (cuda.device_array(nq, np.uint32, stream=stream),
                     cuda.device_array(na, np.float32, stream=stream))
            launch_quantize(flat, d_x.size, *codes, stream)
        elif uses_split(w, kernel == "gemv"):
            nh, ns, nx = split_sizes(*d_x.shape)
            codes = (cuda.device_array(nh, np.uint32, stream=stream),
                     cuda.device_array(ns, np.uint32, stream=stream),
                     cuda.device_array(nx, np.float32, stream=stream))
            launch_split(flat, *d_x.shape, *codes, stream)
        launch_expert_gemm(w, v, flat, plan, min(w.num_experts, p), m_blocks, p, top_k,
                           out.reshape(out.size), kernel == "gemv", stream, 2, nt, codes)
    return out

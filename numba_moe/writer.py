"""Synthetic MoE GGUF files with llama.cpp's tensor names and metadata.

Tests, examples, benchmarks and the embedded default model are built with
:func:`write_moe_gguf`.  Every file it writes is a valid GGUF that
``numba_moe.load_moe_layer`` (and llama.cpp's loader, for the tensors it
holds) understands.
"""
from __future__ import annotations

import os
from typing import Optional

import gguf
import numpy as np

from .errors import MoEError
from .quants import as_qtype, quantize

__all__ = ["write_moe_gguf", "ARCH_DEFAULTS"]

Q = gguf.GGMLQuantizationType

#: Per-architecture conventions of llama.cpp: which metadata key carries
#: the expert FFN width, whether the top-k weights are renormalized, and the
#: kind of shared expert ("gated": scaled by sigmoid(x . ffn_gate_inp_shexp),
#: "plain": added unscaled, None: no shared expert).
ARCH_DEFAULTS = {
    "qwen3moe": dict(ff_key="expert_feed_forward_length", norm=True, shared=None),
    "qwen2moe": dict(ff_key="expert_feed_forward_length", norm=False, shared="gated"),
    "olmoe": dict(ff_key="feed_forward_length", norm=False, shared=None),
    "llama": dict(ff_key="feed_forward_length", norm=True, shared=None),
    "deepseek2": dict(ff_key="expert_feed_forward_length", norm=None, shared="plain"),
}

_INITS = ("quantize", "random_blocks")

# Block-scale byte offsets and magnitudes for init="random_blocks": the
# fp16 scales are rewritten so values come out at roughly `std` instead of
# the inf/NaN/1e4 that random bytes would give.  (offset, divisor) pairs.
_RANDOM_SCALES = {
    Q.Q4_K: ((0, 120.0), (2, 60.0)),     # d, dmin: x = d*sc*q - dmin*m
    Q.Q5_K: ((0, 240.0), (2, 120.0)),
    Q.Q6_K: ((208, 2000.0),),            # x = d*sc*(q - 32), sc int8
    Q.Q8_0: ((0, 64.0),),                # x = d*q
}


def _encode(rng: np.random.Generator, shape, qtype, std: float, init: str) -> np.ndarray:
    """Weights of logical ``shape`` (last axis quantized) stored as ``qtype``."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise MoEError(f"row length {shape[-1]} is not a multiple of the {qtype.name} "
                       f"block size {block}")
    if init == "random_blocks" and qtype in _RANDOM_SCALES:
        nblocks = int(np.prod(shape, dtype=np.int64)) // block
        raw = rng.integers(0, 256, size=(nblocks, type_size), dtype=np.uint8)
        for off, div in _RANDOM_SCALES[qtype]:
            scale = (std / div) * rng.uniform(0.5, 1.5, size=nblocks)
            raw[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(nblocks, 2)
        return raw.reshape(tuple(shape[:-1]) + (shape[-1] // block * type_size,))
    w = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16)
    return quantize(w, qtype)


def write_moe_gguf(path, arch: str = "qwen3moe", *, num_layers: int = 1, hidden_size: int = 256,
                   expert_intermediate: int = 256, num_experts: int = 8, top_k: int = 2,
                   gate_type="Q4_K", up_type="Q4_K", down_type="Q6_K", router_type="F32",
                   shared_intermediate: Optional[int] = None, fused_gate_up: bool = False,
                   norm_topk_prob: Optional[bool] = None, gating_func: str = "softmax",
                   n_group: int = 1, topk_group: int = 1, weights_scale: float = 1.0,
                   selection_bias: Optional[bool] = None, leading_dense: int = 0,
                   init: str = "quantize", seed: int = 0) -> str:
    """Write a synthetic MoE model file with llama.cpp naming and metadata.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (overwritten).
    arch : {'qwen3moe', 'qwen2moe', 'olmoe', 'llama', 'deepseek2'} or str
        ``general.architecture``; an unknown name writes the qwen3moe layout
        under that name (to exercise the loader's unknown-arch path).
    num_layers : int
        ``block_count``; layers ``< leading_dense`` get a dense FFN
        (``ffn_gate/up/down``, F32), the rest are MoE layers.
    hidden_size, expert_intermediate, num_experts, top_k : int
        H, I, E, K.  H and I must be multiples of the block size of the
        types that quantize along them.
    gate_type, up_type, down_type, router_type : str or GGMLQuantizationType
        Storage type of each tensor (any type ``numba_moe.quants.quantize``
        handles, F32 and F16 included).  The shared expert uses the same types.
    shared_intermediate : int, optional
        Width of the shared expert (qwen2moe and deepseek2 only; default I).
    fused_gate_up : bool
        Write one ``ffn_gate_up_exps`` (E, 2I, H) instead of gate and up.
    norm_topk_prob : bool, optional
        deepseek2's ``expert_weights_norm`` (default False); ignored elsewhere.
    gating_func : {'softmax', 'sigmoid'}
        deepseek2's ``expert_gating_func``.
    n_group, topk_group : int
        deepseek2's ``expert_group_count`` / ``expert_group_used_count``.
    weights_scale : float
        deepseek2's ``expert_weights_scale``.
    selection_bias : bool, optional
        Write ``exp_probs_b.bias`` (default: deepseek2 with sigmoid gating).
    leading_dense : int
        ``leading_dense_block_count`` (deepseek2).
    init : {'quantize', 'random_blocks'}
        ``quantize``: gaussian float weights quantized with
        :func:`numba_moe.quants.quantize`.  ``random_blocks``: random bytes
        with sane fp16 block scales for Q4_K/Q5_K/Q6_K/Q8_0 (fast, for
        benchmark-sized files; other types are quantized).
    seed : int
        Seed of all random draws.

    Returns
    -------
    str
        ``path``.
    """
    if init not in _INITS:
        raise MoEError(f"init={init!r}: expected one of {_INITS}")
    if gating_func not in ("softmax", "sigmoid"):
        raise MoEError(f"gating_func={gating_func!r}: expected 'softmax' or 'sigmoid'")
    for name, v in (("num_layers", num_layers), ("hidden_size", hidden_size),
                    ("expert_intermediate", expert_intermediate), ("num_experts", num_experts),
                    ("top_k", top_k), ("n_group", n_group), ("topk_group", topk_group)):
        if int(v) < 1:
            raise MoEError(f"{name}={v}: expected >= 1")
    if top_k > num_experts:
        raise MoEError(f"top_k={top_k} exceeds num_experts={num_experts}")
    if not 0 <= leading_dense < num_layers:
        raise MoEError(f"leading_dense={leading_dense}: expected 0 <= leading_dense < "
                       f"num_layers={num_layers}")
    gate_q, up_q, down_q, router_q = (as_qtype(t) for t in (gate_type, up_type, down_type,
                                                             router_type))
    if fused_gate_up and gate_q != up_q:
        raise MoEError("fused_gate_up needs gate_type == up_type")
    conv = ARCH_DEFAULTS.get(arch, ARCH_DEFAULTS["qwen3moe"])
    H, I, E, K = int(hidden_size), int(expert_intermediate), int(num_experts), int(top_k)
    Is = int(shared_intermediate or I)
    if selection_bias is None:
        selection_bias = arch == "deepseek2" and gating_func == "sigmoid"
    rng = np.random.default_rng(seed)

    path = os.fspath(path)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"numba_moe synthetic {arch}")
    w.add_block_count(num_layers)
    w.add_context_length(4096)
    w.add_embedding_length(H)
    w.add_expert_count(E)
    w.add_expert_used_count(K)
    if conv["ff_key"] == "feed_forward_length":
        w.add_feed_forward_length(I)
    else:
        w.add_expert_feed_forward_length(I)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(Is)
    if arch == "deepseek2":
        if Is % I:
            raise MoEError(f"deepseek2: shared_intermediate={Is} must be a multiple of "
                           f"expert_intermediate={I} (expert_shared_count experts)")
        w.add_feed_forward_length(I)
        w.add_leading_dense_block_count(leading_dense)
        w.add_expert_shared_count(Is // I)
        w.add_expert_weights_scale(float(weights_scale))
        w.add_expert_weights_norm(bool(norm_topk_prob))
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if gating_func == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_expert_group_count(n_group)
        w.add_expert_group_used_count(topk_group)

    def add(name, shape, qtype, std):
        arr = _encode(rng, shape, qtype, std, init)
        w.add_tensor(name, arr, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)

    sh, si = 1.0 / np.sqrt(H), 1.0 / np.sqrt(I)
    for b in range(num_layers):
        p = f"blk.{b}."
        if b < leading_dense:
            add(p + "ffn_gate.weight", (I, H), Q.F32, sh)
            add(p + "ffn_up.weight", (I, H), Q.F32, sh)
            add(p + "ffn_down.weight", (H, I), Q.F32, si)
            continue
        # Router rows spread wider than 1/sqrt(H) so that routing is peaked
        # like a trained model's, not uniform.
        add(p + "ffn_gate_inp.weight", (E, H), router_q, 4.0 * sh)
        if fused_gate_up:
            add(p + "ffn_gate_up_exps.weight", (E, 2 * I, H), gate_q, sh)
        else:
            add(p + "ffn_gate_exps.weight", (E, I, H), gate_q, sh)
            add(p + "ffn_up_exps.weight", (E, I, H), up_q, sh)
        add(p + "ffn_down_exps.weight", (E, H, I), down_q, si)
        if selection_bias:
            w.add_tensor(p + "exp_probs_b.bias",
                         (rng.standard_normal(E) * 0.05).astype(np.float32))
        if conv["shared"] is not None:
            add(p + "ffn_gate_shexp.weight", (Is, H), gate_q, sh)
            add(p + "ffn_up_shexp.weight", (Is, H), up_q, sh)
            add(p + "ffn_down_shexp.weight", (H, Is), down_q, 1.0 / np.sqrt(Is))
            if conv["shared"] == "gated":
                w.add_tensor(p + "ffn_gate_inp_shexp.weight",
                             (rng.standard_normal(H) * sh).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

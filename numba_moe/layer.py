"""One MoE layer of a GGUF model: loading and the forward entry points."""
from __future__ import annotations

import threading
import warnings
from typing import NamedTuple, Optional

import gguf
import numpy as np

from .config import get_config
from .errors import GGUFError, MoEError
from .experts import NATIVE_QTYPES, ExpertTensor
from .gguf_io import GGUFFile
from .threading_guard import parallel_launch
from .writer import ARCH_DEFAULTS

__all__ = ["MoELayer", "SharedExpert", "load_moe_layer", "GATINGS"]

Q = gguf.GGMLQuantizationType
GATINGS = ("softmax", "sigmoid", "softmax_weight")
_DENSE_ROUTER_TYPES = (Q.F32,)


class SharedExpert(NamedTuple):
    """The always-on shared expert of qwen2moe / deepseek2 layers.

    ``gate``, ``up``: ExpertTensor (1, Is, H); ``down``: (1, H, Is);
    ``gate_inp``: float32 [H] (qwen2moe: the output is scaled by
    ``sigmoid(x . gate_inp)``) or None (deepseek2: added unscaled).
    """

    gate: ExpertTensor
    up: ExpertTensor
    down: ExpertTensor
    gate_inp: Optional[np.ndarray]


class MoELayer:
    """One MoE layer: router, stacked experts, optional shared expert.

    Build it with :func:`load_moe_layer`.  Expert tensors of the native
    block types are views of the file's memory map (nothing is copied or
    dequantized at load).

    Attributes
    ----------
    arch : str
        ``general.architecture`` of the file.
    num_experts, top_k, hidden_size, expert_intermediate : int
        E, K, H, I.
    norm_topk_prob : bool
        Whether the top-k weights are renormalized to sum to 1.
    gating : {'softmax', 'sigmoid', 'softmax_weight'}
        How router logits become probabilities (see :func:`numba_moe.route`).
    n_group, topk_group : int
        Group-limited top-k (deepseek2); 1, 1 elsewhere.
    routed_scale : float
        Factor on the routed weights (deepseek2's ``expert_weights_scale``).
    selection_bias : numpy.ndarray or None
        float32 [E] added to the scores for selection only.
    router : numpy.ndarray
        float32 [E, H] router weights.
    gate, up, down : ExpertTensor
        (E, I, H), (E, I, H), (E, H, I).
    gate_up_fused : ExpertTensor or None
        The (E, 2I, H) tensor when the file fuses gate and up
        (``gate``/``up`` are then zero-copy halves of it).
    shared : SharedExpert or None
    path : str
        The file.
    layer_index : int
    """

    def __init__(self, *, arch, layer_index, path, router, gate, up, down, gate_up_fused,
                 shared, norm_topk_prob, gating, n_group, topk_group, routed_scale,
                 selection_bias, top_k, file):
        self.arch = arch
        self.layer_index = layer_index
        self.path = path
        self.router = router
        self.gate, self.up, self.down = gate, up, down
        self.gate_up_fused = gate_up_fused
        self.shared = shared
        self.num_experts = gate.num_experts
        self.hidden_size = gate.cols
        self.expert_intermediate = gate.rows
        self.top_k = int(top_k)
        self.norm_topk_prob = bool(norm_topk_prob)
        self.gating = gating
        self.n_group = int(n_group)
        self.topk_group = int(topk_group)
        self.routed_scale = float(routed_scale)
        self.selection_bias = selection_bias
        # The reader owns the memory map the expert views point into.
        self._file = file
        self._lock = threading.Lock()
        self._cuda = None

    def __repr__(self) -> str:
        types = "/".join(t.qtype.name for t in (self.gate, self.up, self.down))
        return (f"MoELayer({self.arch}, layer {self.layer_index}: E={self.num_experts}, "
                f"K={self.top_k}, H={self.hidden_size}, I={self.expert_intermediate}, "
                f"{types}, gating={self.gating}, norm_topk_prob={self.norm_topk_prob}"
                f"{', shared expert' if self.shared else ''})")

    @property
    def expert_tensors(self):
        """All expert projections (routed, then shared), as ExpertTensors."""
        ts = [self.gate, self.up, self.down]
        if self.shared is not None:
            ts += [self.shared.gate, self.shared.up, self.shared.down]
        return ts

    def expert_bytes(self) -> int:
        """Bytes of one routed expert's gate + up + down blocks."""
        return sum(t.expert_nbytes() for t in (self.gate, self.up, self.down))

    # -- validation -------------------------------------------------------

    def check_input(self, x) -> np.ndarray:
        """Validate hidden states for the CPU path.

        Parameters
        ----------
        x : numpy.ndarray
            float32 [T, H], C-contiguous, T >= 1.

        Raises
        ------
        MoEError
            Wrong type, dtype, ndim, width or layout (no silent copies: a
            non-contiguous ``x`` is refused so that the caller sees the cost).
        """
        if not isinstance(x, np.ndarray):
            raise MoEError(f"x: expected a numpy.ndarray (float32 [T, {self.hidden_size}]) "
                           f"for device='cpu', got {type(x).__name__}")
        if x.dtype != np.float32:
            raise MoEError(f"x: expected dtype float32, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.hidden_size:
            raise MoEError(f"x: expected shape [T, {self.hidden_size}], got {list(x.shape)}")
        if x.shape[0] < 1:
            raise MoEError("x: expected at least one token (T >= 1), got T=0")
        if not x.flags.c_contiguous:
            raise MoEError("x: expected a C-contiguous array; pass np.ascontiguousarray(x)")
        if isinstance(x, np.ma.MaskedArray):
            raise MoEError("x: expected a plain numpy.ndarray, got a masked array (the kernels "
                           "cannot honour the mask)")
        # Numba types subclasses (np.matrix, ...) differently or not at all:
        # hand the kernels a plain zero-copy view.
        return x if type(x) is np.ndarray else x.view(np.ndarray)

    # -- routing ----------------------------------------------------------

    def router_logits(self, x: np.ndarray) -> np.ndarray:
        """Router logits ``x @ router.T``: float32 [T, E].

        Computed by the same Numba kernel the CPU forward uses (not numpy's
        BLAS, whose idle spinning threads slow the expert kernels that
        follow), so ``route(x)`` picks exactly the experts ``layer(x)`` runs.
        """
        from .cpu.logits import router_logits

        return router_logits(self.check_input(x), self.router)

    def route(self, x: np.ndarray):
        """Route hidden states: RouterOutput(expert_ids int32 [T,K], expert_weights float32 [T,K])."""
        from .routing import route

        return route(self.router_logits(x), self.top_k, norm_topk_prob=self.norm_topk_prob,
                     gating=self.gating, selection_bias=self.selection_bias,
                     n_group=self.n_group, topk_group=self.topk_group, scale=self.routed_scale)

    # -- forward ----------------------------------------------------------

    def __call__(self, x, device: str = "cpu", out=None):
        """Run the layer: router, top-k experts, weighted combine (+ shared expert).

        Parameters
        ----------
        x : array
            Hidden states float32 [T, H].  ``device='cpu'``: a C-contiguous
            numpy array.  ``device='cuda'``: numpy (copied in, result copied
            back) or any ``__cuda_array_interface__`` array (the result stays
            on the GPU).  NaN/Inf in ``x`` propagate to the affected rows.
        device : {'cpu', 'cuda'}
        out : __cuda_array_interface__ array, optional
            ``device='cuda'`` with a device ``x`` only: float32 [T, H] device
            array to write the result into.  Without it the result is the
            layer's own output buffer, overwritten by the next call.

        Returns
        -------
        float32 [T, H]
            numpy for numpy ``x``; a device array for a device ``x``.
        """
        if device == "cpu":
            if out is not None:
                raise MoEError("out= is only supported with device='cuda'")
            x = self.check_input(x)
            if get_config().path == "reference":
                from .reference import moe_forward_reference

                return moe_forward_reference(self, x)
            from .cpu.forward import moe_forward

            return moe_forward(self, x)
        if device == "cuda":
            from .cuda.forward import moe_forward_cuda

            return moe_forward_cuda(self, x, out)
        raise MoEError(f"device={device!r}: expected 'cpu' or 'cuda'")

    def to(self, device: str) -> "MoELayer":
        """Make the layer ready for ``device``; ``'cuda'`` uploads the raw blocks once.

        Returns the layer itself (chainable).
        """
        if device == "cpu":
            return self
        if device == "cuda":
            from .cuda.forward import upload

            with self._lock:
                if self._cuda is None:
                    self._cuda = upload(self)
            return self
        raise MoEError(f"device={device!r}: expected 'cpu' or 'cuda'")


# -- loading -----------------------------------------------------------------


def _expert_tensor(f: GGUFFile, name: str, expect: tuple) -> ExpertTensor:
    """The stacked tensor ``name`` checked against the (E, rows, cols) metadata says."""
    shape = f.tensor_shape(name)
    if len(shape) == 2 and expect[0] == 1:
        shape = (1,) + shape
    if shape != expect:
        raise GGUFError(f"{f.path}: tensor {name!r} has shape {list(shape)}, the metadata "
                        f"implies {list(expect)}")
    qtype = f.tensor_qtype(name)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        raise GGUFError(f"{f.path}: tensor {name!r}: row length {shape[-1]} is not a multiple "
                        f"of the {qtype.name} block size {block}")
    raw = f.tensor_bytes(name).reshape(shape[:-1] + (-1,))
    _check_decodable(f, name, qtype, raw)
    data = raw.view(np.float32) if qtype == Q.F32 else raw
    return ExpertTensor(name, qtype, shape[0], shape[1], shape[2], data)


def _check_decodable(f: GGUFFile, name: str, qtype, raw: np.ndarray) -> None:
    """Raise now, not at the first forward, for a type nothing can decode (I32, F64, ...)."""
    if qtype in NATIVE_QTYPES or qtype == Q.F32:
        return
    try:
        with np.errstate(all="ignore"):
            gguf.quants.dequantize(raw.reshape(-1)[:gguf.GGML_QUANT_SIZES[qtype][1]], qtype)
    except NotImplementedError as exc:
        raise GGUFError(f"{f.path}: tensor {name!r} has type {qtype.name}, which neither "
                        "numba_moe nor gguf.quants can decode") from exc


def _dense_vector_or_matrix(f: GGUFFile, name: str, expect: tuple) -> np.ndarray:
    """A small float tensor (router, bias, shared gate) as float32, checked."""
    shape = f.tensor_shape(name)
    if shape != expect:
        raise GGUFError(f"{f.path}: tensor {name!r} has shape {list(shape)}, expected "
                        f"{list(expect)}")
    qtype = f.tensor_qtype(name)
    raw = f.tensor_bytes(name)
    _check_decodable(f, name, qtype, raw)
    if qtype == Q.F32:
        return np.ascontiguousarray(raw.view(np.float32).reshape(expect))
    from .quants import dequantize

    with parallel_launch():
        dense = dequantize(raw, qtype)
    return np.ascontiguousarray(dense.reshape(expect), dtype=np.float32)


def _split_fused(t: ExpertTensor, inter: int):
    """Zero-copy gate / up halves of a fused (E, 2I, H) tensor."""
    halves = []
    for i, part in enumerate(("gate", "up")):
        data = t.data[:, i * inter:(i + 1) * inter]
        halves.append(ExpertTensor(f"{t.name}[{part}]", t.qtype, t.num_experts, inter, t.cols,
                                   data))
    return halves


def load_moe_layer(path, layer: int = 0, *, norm_topk_prob: Optional[bool] = None,
                   gating: Optional[str] = None) -> MoELayer:
    """Load MoE layer ``layer`` of a GGUF file, zero-copy over its memory map.

    Parameters
    ----------
    path : str or os.PathLike
        A GGUF file holding a MoE model (qwen3moe, qwen2moe, olmoe, llama
        (Mixtral), deepseek2, or another arch with llama.cpp's stacked expert
        tensors).
    layer : int
        Block index ``N`` of ``blk.N.*``.
    norm_topk_prob : bool, optional
        Override the architecture's renormalization default.  Required for
        an unknown architecture.
    gating : {'softmax', 'sigmoid', 'softmax_weight'}, optional
        Override the gating function.

    Returns
    -------
    MoELayer

    Raises
    ------
    GGUFError
        Missing/corrupt file, key or tensor, layer out of range or dense,
        shapes that disagree with the metadata, rows not a multiple of the
        block size.  The message names the file and the key or tensor.
    """
    f = GGUFFile(path)
    arch = f.arch
    if gating is not None and gating not in GATINGS:
        raise MoEError(f"gating={gating!r}: expected one of {GATINGS}")
    if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
        raise MoEError(f"layer={layer!r}: expected an integer block index")
    n_blocks = f.get_int(f"{arch}.block_count", minimum=1)
    if not 0 <= layer < n_blocks:
        raise GGUFError(f"{f.path}: layer {layer} out of range: {arch}.block_count = {n_blocks}")
    conv = ARCH_DEFAULTS.get(arch)
    p = f"blk.{layer}."
    fused = f.has_tensor(p + "ffn_gate_up_exps.weight")
    if conv is None:
        if not (f.has_tensor(p + "ffn_gate_exps.weight") or fused):
            raise GGUFError(f"{f.path}: architecture {arch!r} is not supported and block {layer} "
                            "has no stacked expert tensors (blk.N.ffn_gate_exps.weight)")
        if norm_topk_prob is None:
            raise MoEError(f"{f.path}: unknown MoE architecture {arch!r}: pass "
                           "norm_topk_prob=True/False to load_moe_layer (softmax gating is assumed)")
        warnings.warn(f"{f.path}: unknown architecture {arch!r}: loading its expert tensors with "
                      f"softmax gating and norm_topk_prob={norm_topk_prob}", RuntimeWarning,
                      stacklevel=2)
        conv = dict(ff_key="expert_feed_forward_length", norm=norm_topk_prob, shared=None)
    if arch == "deepseek2":
        dense = f.get_int(f"{arch}.leading_dense_block_count", 0, minimum=0)
        if layer < dense:
            raise GGUFError(f"{f.path}: layer {layer} is a dense FFN layer "
                            f"({arch}.leading_dense_block_count = {dense})")

    E = f.get_int(f"{arch}.expert_count", minimum=1)
    K = f.get_int(f"{arch}.expert_used_count", minimum=1)
    H = f.get_int(f"{arch}.embedding_length", minimum=1)
    ff_key = f"{arch}.{conv['ff_key']}"
    if not f.has(ff_key) and f.has(f"{arch}.expert_feed_forward_length"):
        ff_key = f"{arch}.expert_feed_forward_length"
    I = f.get_int(ff_key, minimum=1)
    if K > E:
        raise GGUFError(f"{f.path}: {arch}.expert_used_count = {K} exceeds "
                        f"{arch}.expert_count = {E}")

    router = _dense_vector_or_matrix(f, p + "ffn_gate_inp.weight", (E, H))
    gate_up_fused = None
    if fused:
        gate_up_fused = _expert_tensor(f, p + "ffn_gate_up_exps.weight", (E, 2 * I, H))
        gate, up = _split_fused(gate_up_fused, I)
    else:
        gate = _expert_tensor(f, p + "ffn_gate_exps.weight", (E, I, H))
        up = _expert_tensor(f, p + "ffn_up_exps.weight", (E, I, H))
    down = _expert_tensor(f, p + "ffn_down_exps.weight", (E, H, I))

    n_group, topk_group, scale, bias = 1, 1, 1.0, None
    gate_fn = "softmax"
    norm = conv["norm"]
    if arch == "deepseek2":
        code = f.get_int(f"{arch}.expert_gating_func", 1)
        if code not in (1, 2):
            raise GGUFError(f"{f.path}: {arch}.expert_gating_func = {code}: expected 1 (softmax) "
                            "or 2 (sigmoid)")
        gate_fn = "softmax" if code == 1 else "sigmoid"
        norm = f.get_bool(f"{arch}.expert_weights_norm", False)
        scale = f.get_float(f"{arch}.expert_weights_scale", 1.0)
        n_group = f.get_int(f"{arch}.expert_group_count", 1, minimum=1)
        topk_group = f.get_int(f"{arch}.expert_group_used_count", 1, minimum=1)
        if E % n_group:
            raise GGUFError(f"{f.path}: {arch}.expert_group_count = {n_group} does not divide "
                            f"{arch}.expert_count = {E}")
        if not 1 <= topk_group <= n_group or topk_group * (E // n_group) < K:
            raise GGUFError(f"{f.path}: {arch}.expert_group_used_count = {topk_group} is "
                            f"invalid for {n_group} groups of {E // n_group} experts and top-{K}")
    if f.has_tensor(p + "exp_probs_b.bias"):
        bias = _dense_vector_or_matrix(f, p + "exp_probs_b.bias", (E,))
    if norm_topk_prob is not None:
        norm = bool(norm_topk_prob)
    if gating is not None:
        gate_fn = gating

    # Where the metadata gives the shared expert's width, it must be there
    # and have that width (a renamed or reshaped tensor must not vanish).
    shared_width = None
    if arch == "deepseek2" and f.has(f"{arch}.expert_shared_count"):
        shared_width = f.get_int(f"{arch}.expert_shared_count", minimum=0) * I
    elif f.has(f"{arch}.expert_shared_feed_forward_length"):
        shared_width = f.get_int(f"{arch}.expert_shared_feed_forward_length", minimum=1)
    if shared_width:
        f.tensor(p + "ffn_gate_shexp.weight")  # raises if missing
    shared = None
    if f.has_tensor(p + "ffn_gate_shexp.weight"):
        s_shape = f.tensor_shape(p + "ffn_gate_shexp.weight")
        if len(s_shape) != 2:
            raise GGUFError(f"{f.path}: tensor {p + 'ffn_gate_shexp.weight'!r} has shape "
                            f"{list(s_shape)}, expected [Is, {H}]")
        Is = s_shape[0]
        if shared_width is not None and Is != shared_width:
            raise GGUFError(f"{f.path}: tensor {p + 'ffn_gate_shexp.weight'!r} has shape "
                            f"{list(s_shape)}, the metadata implies [{shared_width}, {H}]")
        s_gate = _expert_tensor(f, p + "ffn_gate_shexp.weight", (1, Is, H))
        s_up = _expert_tensor(f, p + "ffn_up_shexp.weight", (1, Is, H))
        s_down = _expert_tensor(f, p + "ffn_down_shexp.weight", (1, H, Is))
        s_inp = None
        if f.has_tensor(p + "ffn_gate_inp_shexp.weight"):
            s_inp = _dense_vector_or_matrix(f, p + "ffn_gate_inp_shexp.weight", (H,))
        elif conv["shared"] == "gated":
            f.tensor(p + "ffn_gate_inp_shexp.weight")  # raises: missing tensor
        shared = SharedExpert(s_gate, s_up, s_down, s_inp)
    elif conv["shared"] is not None and arch == "qwen2moe":
        f.tensor(p + "ffn_gate_shexp.weight")  # raises: missing tensor

    return MoELayer(arch=arch, layer_index=int(layer), path=f.path, router=router, gate=gate,
                    up=up, down=down, gate_up_fused=gate_up_fused, shared=shared,
                    norm_topk_prob=norm, gating=gate_fn, n_group=n_group,
                    topk_group=topk_group, routed_scale=scale, selection_bias=bias, top_k=K,
                    file=f)

"""The MoE layer forward on the GPU, device-resident from router to output.

``MoELayer.to("cuda")`` calls :func:`upload` once (raw blocks to the
device, :mod:`.weights`); ``MoELayer.__call__(x, device="cuda")`` calls
:func:`moe_forward_cuda`.  One forward of T tokens is

    router (+ codes of x) -> top-k -> plan -> gate/up (+SiLU)
    -> codes of the activations -> down [-> shared expert] -> combine

with no host round trip and no allocation once the scratch buffers fit T
(they grow to the largest T seen).  The launches for each T are captured
into a CUDA graph after one eager warm-up run and replayed afterwards
(:mod:`.graph`).

Kernel choice per T.  When the average number of tokens per expert (``T *
K / E``; ``T`` for the shared expert) is at most
``CUDA_LAUNCH.gemv_max_tokens`` (``gemv_max_tokens_fp16`` for routed Q4_K /
Q6_K experts), quantized experts run the integer GEMV (:mod:`.qgemv`, 16-bit
activation codes of :mod:`.actquant`, weights read once per pass of up to
:data:`~numba_moe.cuda.gemm.MAX_TOKENS_PER_PASS` tokens of an expert);
otherwise a tensor-core kernel: fp16 for Q4_K / Q6_K (:mod:`.hmma`,
activations split by :mod:`.actsplit`), integer for Q5_K / Q8_0
(:mod:`.mma`), with tiles sized by :func:`routed_tile`.  At most
``CUDA_LAUNCH.pair_slots_max_mean`` tokens per expert the routed GEMVs
read the routing's ids as a plan of one slot per pair (``by_pair``) and the
plan kernel does not run.
Dense (float32) experts take the float GEMV and the SIMT tiled kernel of
:mod:`.gemm` instead.  The router (dense, E rows) runs one block per row up
to ``CUDA_LAUNCH.router_block_max_tokens`` tokens (:mod:`.router`), the
float GEMV up to ``CUDA_LAUNCH.router_gemv_max_tokens`` (by default no
token count), the tiled kernel above, its columns split into partial
planes that the routing kernel adds (E rows alone make too few blocks); the
per-row router kernel also writes the codes of ``x`` (one launch less in a
decode step).
"""
from __future__ import annotations

import threading

import numpy as np
from numba import cuda

from .. import profile
from ..config import CUDA_LAUNCH, get_config
from ..errors import MoEError
from ..routing import _check_params
from .actquant import launch_quantize, quantized_sizes
from .actsplit import launch_split, split_sizes
from .arrays import Transfers, device_arg
from .combine import SHARED_GATED, SHARED_NONE, SHARED_PLAIN, launch_combine
from .graph import CapturedGraph
from .gemm import tokens_per_pass
from .matmul import launch_expert_gemm, uses_codes, uses_split
from .plan import (PAIRS_PER_THREAD, DevicePlan, check_plan_size, empty_plan, launch_plan,
                   plan_capacity)
from .primitives import SIMULATOR, next_pow2
from .qgemv import quantize_fits
from .router import launch_router
from .routing import MAX_TOP_K, check_experts, launch_topk
from .weights import upload_dense, upload_gate_up, upload_weights

__all__ = ["CudaMoE", "upload", "moe_forward_cuda", "routed_tile"]

# meta[1] of the identity plan: "every launched block is inside the padded run".
_NO_LIMIT = 2**31 - 1
# gridDim.z limit; GEMV blocks loop over the passes beyond it
_MAX_SPLITS = 65535


def upload(layer) -> "CudaMoE":
    """Upload ``layer``'s router and expert blocks to the current device.

    Parameters
    ----------
    layer : numba_moe.layer.MoELayer

    Returns
    -------
    CudaMoE
        The device state the lead's ``MoELayer.to("cuda")`` keeps in
        ``layer._cuda``.

    Raises
    ------
    MoEError
        Shapes the CUDA kernels cannot run (H or I not a multiple of 32,
        K > 32).
    """
    return CudaMoE(layer)


def moe_forward_cuda(layer, x, out=None):
    """Run ``layer`` on hidden states ``x`` on the GPU.

    Parameters
    ----------
    layer : numba_moe.layer.MoELayer
        Uploaded on first use (``layer.to("cuda")``).
    x : float32 [T, H], C-contiguous
        numpy (copied in, the result copied back to a new numpy array) or any
        ``__cuda_array_interface__`` array (numba, CuPy, torch), read on the
        device (one device-to-device copy into the layer's input buffer,
        ordered after the work of the stream its interface names).
    out : __cuda_array_interface__ float32 [T, H], optional
        Device destination for a device ``x``.

    The call returns when the result is complete (the host waits for the
    layer's stream).

    Returns
    -------
    numpy.ndarray or numba DeviceNDArray, float32 [T, H]
        numpy for numpy ``x``.  For a device ``x``: ``out`` if given, else a
        view of the layer's own output buffer (the same object for every call
        of T tokens), valid until the next call on this layer (copy it to keep
        it).

    Raises
    ------
    MoEError
        Wrong type, dtype, shape, layout or alignment of ``x`` / ``out``.

    Notes
    -----
    NaN/Inf in ``x`` propagate to the rows of the affected tokens (and the
    router may then pick experts 0..K-1 for them, as on the CPU).
    """
    if layer._cuda is None:
        layer.to("cuda")
    return layer._cuda.forward(x, out)


def routed_tile(mean_tokens: float, tile_m: int) -> int:
    """Plan block size (tiled-GEMM tile) of routed experts holding ``mean_tokens``
    tokens on average: above ``tile_m`` tokens ``tile_m``, else the smallest
    power of two >= ``2 * mean_tokens``, 8 to ``CUDA_LAUNCH.tile_m_small``.

    Fewer padded tokens and more blocks for few tokens an expert (H100, Q4_K /
    Q6_K, whole forward: mean 4 tile 8 598 us, 16: 673; mean 8 tile 16 671,
    8: 810, 32: 869; mean 32 tile 32 1277, 64: 1460; mean 256 tile 64 6359,
    32: 6834)."""
    if mean_tokens > tile_m:
        return tile_m
    bs = 8
    while bs < 2 * mean_tokens and bs < CUDA_LAUNCH.tile_m_small:
        bs <<= 1
    return min(bs, tile_m)


def router_parts(n_tok: int, rows: int, chunks: int, tile_m: int) -> int:
    """Column splits of the router's tiled launch for ``n_tok`` tokens: the
    router has few rows, so its grid alone would leave most of the GPU idle
    while each block walks all ``chunks`` chunks; splits raise it to about
    ``CUDA_LAUNCH.router_split_blocks`` blocks."""
    blocks = -(-n_tok // tile_m) * -(-rows // CUDA_LAUNCH.tile_n)
    return max(1, min(chunks, -(-CUDA_LAUNCH.router_split_blocks // blocks)))


def _identity_plan(cap: int, block_size: int, stream) -> DevicePlan:
    """A plan with one expert owning slots 0..cap-1 (slot = token); forwards
    pass the real T as ``num_pairs``, which clamps it."""
    n_sorted, n_blocks = plan_capacity(cap, 1, block_size)
    ar = np.arange(max(cap, n_sorted), dtype=np.int32)
    dev = lambda a: cuda.to_device(np.ascontiguousarray(a, dtype=np.int32), stream=stream)  # noqa: E731
    return DevicePlan(dev([0, cap]), dev(ar[:cap]), dev(ar[:cap]), dev([0]),
                      dev([1, _NO_LIMIT]), dev(ar[:n_sorted]), dev(np.zeros(n_blocks)))


def _pair_plan(ids, num_pairs: int, top_k: int, stream) -> DevicePlan:
    """The plan of one slot per pair, for the GEMVs' ``by_pair`` mode: slot
    ``p`` holds pair ``p`` (token ``p // top_k``) with expert ``ids[p]``;
    the fields those kernels do not read hold one element."""
    ar = np.arange(num_pairs, dtype=np.int32)
    dev = lambda a: cuda.to_device(a, stream=stream)  # noqa: E731
    unused = dev(np.zeros(1, np.int32))
    return DevicePlan(unused, dev(ar // top_k), dev(ar), ids, unused, unused, unused)


class _Buffers:
    """Scratch for up to ``cap`` tokens (flat float32 / int32 device arrays)."""

    def __init__(self, st: "CudaMoE", cap: int, stream):
        e, k, h, i = st.num_experts, st.top_k, st.hidden, st.inter
        p = cap * k
        f32 = lambda n: cuda.device_array(max(n, 1), np.float32, stream=stream)  # noqa: E731

        def codes(n):
            nq, na = quantized_sizes(n)
            return (cuda.device_array(max(nq, 1), np.uint32, stream=stream), f32(na))

        def split(n_rows, cols, *ws):
            # only for weights the fp16 tensor-core kernel reads (at large T)
            if not any(uses_split(w, False) for w in ws):
                return None
            nh, ns, nx = split_sizes(n_rows, cols)
            return (cuda.device_array(max(nh, 1), np.uint32, stream=stream),
                    cuda.device_array(max(ns, 1), np.uint32, stream=stream), f32(nx))

        self.cap = cap
        self.x = f32(cap * h)
        self.out = f32(cap * h)
        # [T, H] views of out returned to device callers, made once per T
        self.out_views = {}
        self.logits = f32(st.logits_size(cap))
        self.ids = cuda.device_array(p, np.int32, stream=stream)
        self.weights = f32(p)
        self.plan = empty_plan(p, e, st.block_size, stream)
        self.pairs = _pair_plan(self.ids, p, k, stream)
        self.ident = _identity_plan(cap, st.block_size, stream)
        self.act = f32(p * i)
        self.rows = f32(p * h)
        # x, act and sh_act as 16-bit codes (.actquant: integer kernels) and
        # as fp16 pairs (.actsplit: the fp16 tensor-core kernel)
        self.x_codes = codes(cap * h)
        self.act_codes = codes(p * i)
        sh = st.shared
        self.x_split = split(cap, h, st.gate, *(sh[:1] if sh else ()))
        self.act_split = split(p, i, st.down)
        if st.shared is not None:
            sh_i = st.shared[0].rows
            self.sh_act = f32(cap * sh_i)
            self.sh_rows = f32(cap * h)
            self.sh_act_codes = codes(cap * sh_i)
            self.sh_act_split = split(cap, sh_i, sh[2])
        else:
            self.sh_act = self.sh_rows = self.out
            self.sh_act_codes = self.sh_act_split = None


class CudaMoE:
    """Device state of one MoE layer: weights, scratch, captured graphs.

    Build it with :func:`upload`.  Calls are serialised by a lock (the
    scratch is shared).
    """

    def __init__(self, layer):
        e, k = layer.num_experts, layer.top_k
        self.params = _check_params(e, k, layer.norm_topk_prob, layer.gating,
                                    layer.selection_bias, layer.n_group, layer.topk_group,
                                    layer.routed_scale)
        if k > MAX_TOP_K:
            raise MoEError(f"top_k={k}: the CUDA path supports K <= {MAX_TOP_K}")
        for t in layer.expert_tensors:
            if t.cols % 32:
                raise MoEError(f"{t.name}: the CUDA path needs rows of a multiple of 32 "
                               f"values, got {t.cols}")
        self.num_experts, self.top_k = e, k
        self.hidden, self.inter = layer.hidden_size, layer.expert_intermediate
        self.block_size = CUDA_LAUNCH.tile_m
        check_plan_size(k, e, self.block_size)
        check_experts(e, layer.n_group)
        self.stream = cuda.stream()
        self.transfers = Transfers(self.stream)
        s = self.stream
        router = np.asarray(layer.router, dtype=np.float32)
        sh = layer.shared
        gated = sh is not None and sh.gate_inp is not None
        if gated:
            router = np.concatenate([router, np.asarray(sh.gate_inp, np.float32)[None]], axis=0)
        self.lstride = router.shape[0]
        self.shared_mode = SHARED_NONE if sh is None else (SHARED_GATED if gated else SHARED_PLAIN)
        self.router = upload_dense("router", router[None], s)
        self.gate, self.up = upload_gate_up(layer.gate, layer.up, s)
        self.down = upload_weights(layer.down, s)
        self.shared = None
        if sh is not None:
            self.shared = (*upload_gate_up(sh.gate, sh.up, s), upload_weights(sh.down, s))
        bias = self.params[3]
        self.bias = cuda.to_device(bias if bias.shape[0] else np.zeros(1, np.float32), stream=s)
        self.buffers = None
        self.graphs = {}
        self.lock = threading.Lock()
        s.synchronize()

    @property
    def nbytes(self) -> int:
        """Device bytes of the uploaded weights."""
        ws = [self.router, self.gate, self.up, self.down] + list(self.shared or ())
        return sum(w.nbytes for w in ws)

    # -- per call -----------------------------------------------------------

    def forward(self, x, out=None):
        """See :func:`moe_forward_cuda`."""
        h = self.hidden
        arg = device_arg(x)
        if arg is None:
            if not isinstance(x, np.ndarray):
                raise MoEError(f"x: expected a numpy array or a __cuda_array_interface__ array "
                               f"(float32 [T, {h}]), got {type(x).__name__}")
            shape, dtype, contiguous = x.shape, x.dtype, x.flags["C_CONTIGUOUS"]
        else:
            shape, dtype, contiguous = arg.shape, arg.dtype, arg.contiguous
        if dtype != np.float32:
            raise MoEError(f"x: expected dtype float32, got {dtype}")
        if len(shape) != 2 or shape[1] != h:
            raise MoEError(f"x: expected shape [T, {h}], got {list(shape)}")
        n_tok = shape[0]
        if n_tok < 1:
            raise MoEError("x: expected at least one token (T >= 1), got T=0")
        if not contiguous:
            raise MoEError("x: expected a C-contiguous array")
        check_plan_size(n_tok * self.top_k, self.num_experts, self.block_size)
        nbytes = n_tok * h * 4
        if out is not None:
            if arg is None:
                raise MoEError("out: only for a device x (a numpy x returns a new numpy array)")
            dst = device_arg(out)
            if dst is None or dst.dtype != np.float32 or dst.shape != (n_tok, h) \
                    or not dst.contiguous:
                raise MoEError(f"out: expected a C-contiguous float32 device array of shape "
                               f"[{n_tok}, {h}]")
        io = self.transfers
        with self.lock:
            io.bind_thread()
            buf = self._buffers_for(n_tok)
            # into the layer's own buffer: the captured graphs read fixed addresses
            io.put(buf.x, x if arg is None else arg, nbytes)
            self._run(n_tok)
            if arg is None:
                return io.get(buf.out, (n_tok, h), np.float32)
            if out is not None:
                io.give(dst, buf.out, nbytes)
                io.synchronize()
                return out
            res = buf.out_views.get(n_tok)
            if res is None:
                res = buf.out_views[n_tok] = buf.out[:nbytes // 4].reshape(n_tok, h)
            io.synchronize()
            return res

    def _router_parts(self, n_tok: int) -> int:
        """:func:`router_parts` of this layer's router for ``n_tok`` tokens."""
        r = self.router
        return router_parts(n_tok, r.rows, r.chunks, self.block_size)

    def logits_size(self, cap: int) -> int:
        """Entries of the logits buffer: room for the router's partial planes
        at any count up to ``cap`` tokens (the parts depend on the count of
        token blocks: the most tokens of each count)."""
        bs = self.block_size
        counts = (min(cap, mb * bs) for mb in range(1, -(-cap // bs) + 1))
        return max(self._router_parts(t) * t for t in counts) * self.lstride

    def _buffers_for(self, n_tok: int) -> _Buffers:
        if self.buffers is None or self.buffers.cap < n_tok \
                or self.buffers.logits.size < self._router_parts(n_tok) * n_tok * self.lstride:
            # new addresses: every captured graph points at the old buffers
            self.graphs.clear()
            cap = n_tok if self.buffers is None else max(n_tok, self.buffers.cap)
            self.buffers = None
            self.buffers = _Buffers(self, cap, self.stream)
        return self.buffers

    def _run(self, n_tok: int) -> None:
        profiling = get_config().profile
        if SIMULATOR or profiling or not CUDA_LAUNCH.graphs:
            self._launch_all(n_tok, profiling)
            return
        graph = self.graphs.get(n_tok)
        if graph is None:
            # eager warm-up (compiles and loads every kernel; gives this call's result)
            self._launch_all(n_tok, False)
            self.graphs[n_tok] = CapturedGraph(self.stream, lambda: self._launch_all(n_tok, False))
            return
        graph.replay()

    def _launch_all(self, n_tok: int, profiling: bool) -> None:
        sync = self.stream.synchronize if profiling else None
        for name, launch in self.phases(n_tok):
            with profile.phase(name, sync):
                launch()

    def phases(self, n_tok: int):
        """The forward of ``n_tok`` tokens as ``[(phase name, launch())]``, in
        order; each ``launch()`` enqueues that phase's kernels on the stream
        (the benchmark also times them one by one)."""
        b = self.buffers
        s = self.stream
        e, k = self.num_experts, self.top_k
        p = n_tok * k
        lim = CUDA_LAUNCH.gemv_max_tokens
        routed_lim = CUDA_LAUNCH.gemv_max_tokens_fp16 if uses_split(self.gate, False) else lim
        small = p <= routed_lim * e
        # about one token an expert: the routing's ids serve as the plan
        by_pair = small and p <= CUDA_LAUNCH.pair_slots_max_mean * e
        plan_r = b.pairs if by_pair else b.plan
        # by pair slot (up to gemv_quantize_max_pairs pairs): the down GEMV's
        # blocks quantize their rows themselves
        quantize_in = by_pair and uses_codes(self.down, True) \
            and p <= CUDA_LAUNCH.gemv_quantize_max_pairs and quantize_fits(self.down.chunks)
        slots = p if by_pair else min(e, p)
        shared_small = n_tok <= lim
        router_small = n_tok <= CUDA_LAUNCH.router_gemv_max_tokens
        nt = 1 if by_pair else tokens_per_pass(p / e)
        # Two blocks share the passes of an expert when counts spread around a
        # mean above one token.  Not for passes of one token: the second
        # split's blocks start after every first split's, when the expert's
        # rows have left L2, and read them from DRAM again (H100, Q4_K / Q6_K
        # layer, whole forward with 1 / 2 splits: T=12 182 / 187 us, T=16
        # 217 / 230).
        routed_splits = 1 if nt == 1 or 2 * p <= e else 2
        nt_tok = tokens_per_pass(n_tok)
        # one split per pass of tokens: the router's rows are few, its tokens many
        splits = min(-(-n_tok // nt_tok), _MAX_SPLITS)
        bs = routed_tile(p / e, self.block_size)
        m_blocks = plan_capacity(p, e, bs)[1]
        m_ident = -(-n_tok // self.block_size)
        plan_threads = min(CUDA_LAUNCH.scan_threads,
                           max(32, next_pow2(max(e, -(-p // PAIRS_PER_THREAD)))))

        sh = self.shared
        x_codes = uses_codes(self.gate, small) or (sh is not None
                                                   and uses_codes(sh[0], shared_small))
        x_split = uses_split(self.gate, small) or (sh is not None
                                                   and uses_split(sh[0], shared_small))
        router_block = n_tok <= CUDA_LAUNCH.router_block_max_tokens
        # partial planes of the tiled router, added by the routing kernel
        parts = 1 if router_block or router_small else self._router_parts(n_tok)

        def router():
            if router_block:
                # the router's launch also writes x's codes
                w = self.router
                launch_router(w.planes[0], b.x, n_tok, w.rows, w.cols, self.lstride, b.logits,
                              CUDA_LAUNCH.router_threads, s, b.x_codes if x_codes else None)
                return
            self._gemm(self.router, None, b.x, b.ident, 1, m_ident, n_tok, 1, b.logits,
                       router_small, splits, nt_tok, k_splits=parts)

        def act_of(w, is_small, codes, splits):
            return splits if uses_split(w, is_small) else codes

        def topk():
            launch_topk(b.logits, self.lstride, n_tok, e, self.params, self.bias, b.ids,
                        b.weights, CUDA_LAUNCH.topk_warps, s, parts)

        def plan():
            launch_plan(b.ids, p, k, e, bs, b.plan, plan_threads, s)

        def gemm1():
            # x's codes serve the shared expert's gate/up too
            if x_codes and not router_block:
                launch_quantize(b.x, n_tok * self.hidden, *b.x_codes, s)
            if x_split:
                launch_split(b.x, n_tok, self.hidden, *b.x_split, s)
            self._gemm(self.gate, self.up, b.x, plan_r, slots, m_blocks, p, k, b.act, small,
                       routed_splits, nt, act_of(self.gate, small, b.x_codes, b.x_split), bs,
                       by_pair=by_pair)

        def gemm2():
            if uses_codes(self.down, small) and not quantize_in:
                launch_quantize(b.act, p * self.inter, *b.act_codes, s)
            if uses_split(self.down, small):
                launch_split(b.act, p, self.inter, *b.act_split, s)
            self._gemm(self.down, None, b.act, plan_r, slots, m_blocks, p, k, b.rows, small,
                       routed_splits, nt, act_of(self.down, small, b.act_codes, b.act_split), bs,
                       by_pair=by_pair, quantize=quantize_in)

        def shared():
            sg, su, sd = self.shared
            self._gemm(sg, su, b.x, b.ident, 1, m_ident, n_tok, 1, b.sh_act, shared_small,
                       splits, nt_tok, act_of(sg, shared_small, b.x_codes, b.x_split))
            if uses_codes(sd, shared_small):
                launch_quantize(b.sh_act, n_tok * sg.rows, *b.sh_act_codes, s)
            if uses_split(sd, shared_small):
                launch_split(b.sh_act, n_tok, sg.rows, *b.sh_act_split, s)
            self._gemm(sd, None, b.sh_act, b.ident, 1, m_ident, n_tok, 1, b.sh_rows,
                       shared_small, splits, nt_tok, act_of(sd, shared_small, b.sh_act_codes,
                                                            b.sh_act_split))

        def combine():
            launch_combine(b.rows, plan_r.pairs_by_token, b.weights, n_tok, k, self.hidden,
                           self.shared_mode, b.sh_rows, b.logits, self.lstride, e, b.out,
                           CUDA_LAUNCH.threads, s, by_pair)

        out = [("router", router), ("route", topk)] + ([] if by_pair else [("plan", plan)])
        out += [("gemm1", gemm1), ("gemm2", gemm2)]
        if self.shared is not None:
            out.append(("shared", shared))
        return out + [("combine", combine)]

    def _gemm(self, w, v, x, plan: DevicePlan, expert_slots: int, m_blocks: int,
              num_pairs: int, top_k: int, out, small: bool, splits: int = 1,
              nt: int = 1, codes=None, tile_m: int = None, k_splits: int = 1,
              by_pair: bool = False, quantize: bool = False) -> None:
        launch_expert_gemm(w, v, x, plan, expert_slots, m_blocks, num_pairs, top_k, out,
                           small, self.stream, splits, nt, codes, tile_m or self.block_size,
                           k_splits, by_pair, quantize)

"""GPU benchmark of one Qwen3-30B-A3B MoE layer: ``layer(x, device="cuda")``.

Layer: H=2048, I=768, E=128, K=8, gate/up Q4_K, down Q6_K (what Q4_K_M
files hold), built in memory from random but valid blocks (no GGUF file).
For each token count T it prints, in one run on one card:

* ``ours``: device time of one forward (router, top-k, plan, both GEMMs,
  combine) replayed from its CUDA graph, CUDA events, median of many;
* ``call``: host wall time of a whole ``layer(x_dev, device="cuda")`` call
  (input copy, graph launch, synchronize);
* ``floor``: bytes of the distinct experts the batch touches (plus the
  router) over the device-to-device copy bandwidth measured in this run;
* achieved GB/s over those bytes and TFLOP/s of the expert math;
* vLLM's bf16 fused-MoE kernel time on an H100 (routing excluded) for
  comparison, and the ratio.

``--phases`` adds the device time of each phase (captured and replayed
alone); ``--paths`` also times the GEMV and the tiled kernels at every T.

Usage::

    python benchmarks/bench_cuda.py [--tokens 1 4 16 64 512 4096] [--phases] [--paths]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import gguf
import numpy as np
from numba import cuda

from numba_moe.config import CUDA_LAUNCH
from numba_moe.cuda.graph import CapturedGraph
from numba_moe.experts import ExpertTensor
from numba_moe.layer import MoELayer

Q = gguf.GGMLQuantizationType
H, I, E, K = 2048, 768, 128, 8
#: vLLM fused_moe (bf16, H100), microseconds, routing excluded.
VLLM_US = {1: 44, 4: 113, 16: 283, 64: 424, 512: 476, 4096: 940}


def random_blocks(qtype, e, rows, cols, rng) -> ExpertTensor:
    """Random bytes with fp16 scales in [1e-3, 1e-2): valid blocks, sane values."""
    bsz, tsz = gguf.GGML_QUANT_SIZES[qtype]
    n = e * rows * cols // bsz
    b = rng.integers(0, 256, size=(n, tsz), dtype=np.uint8)
    for off in {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}[qtype]:
        b[:, off:off + 2] = rng.uniform(1e-3, 1e-2, n).astype(np.float16).view(
            np.uint8).reshape(n, 2)
    return ExpertTensor(qtype.name, qtype, e, rows, cols, b.reshape(e, rows, -1))


def build_layer(seed=0) -> MoELayer:
    rng = np.random.default_rng(seed)
    return MoELayer(arch="qwen3moe", layer_index=0, path=None,
                    router=(rng.standard_normal((E, H)) * 0.02).astype(np.float32),
                    gate=random_blocks(Q.Q4_K, E, I, H, rng),
                    up=random_blocks(Q.Q4_K, E, I, H, rng),
                    down=random_blocks(Q.Q6_K, E, H, I, rng),
                    gate_up_fused=None, shared=None, norm_topk_prob=True, gating="softmax",
                    n_group=1, topk_group=1, routed_scale=1.0, selection_bias=None, top_k=K,
                    file=None)


def copy_bandwidth(nbytes=1 << 30, reps=20) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = cuda.device_array(nbytes // 4, np.float32)
    dst = cuda.device_array(nbytes // 4, np.float32)
    dst.copy_to_device(src)
    times = []
    for _ in range(reps):
        a, b = cuda.event(), cuda.event()
        a.record()
        dst.copy_to_device(src)
        b.record()
        b.synchronize()
        times.append(cuda.event_elapsed_time(a, b) / 1e3)
    return 2 * nbytes / statistics.median(times)


def time_graph(st, t, reps) -> float:
    """Median device seconds of one graph replay for T=t (graph already captured)."""
    graph = st.graphs[t]
    times = []
    for _ in range(reps):
        a, b = cuda.event(), cuda.event()
        a.record(st.stream)
        graph.replay()
        b.record(st.stream)
        b.synchronize()
        times.append(cuda.event_elapsed_time(a, b) / 1e3)
    return statistics.median(times)


def time_call(layer, d_x, reps) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        layer(d_x, device="cuda")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def phase_times(st, t, reps=20, inner=10):
    """Median device seconds per phase: each phase captured alone, ``inner``
    times back to back, into a graph whose replay is timed (no launch gaps)."""
    res = {}
    for name, launch in st.phases(t):
        graph = CapturedGraph(st.stream, lambda: [launch() for _ in range(inner)])
        times = []
        for _ in range(reps):
            a, b = cuda.event(), cuda.event()
            a.record(st.stream)
            graph.replay()
            b.record(st.stream)
            b.synchronize()
            times.append(cuda.event_elapsed_time(a, b) / 1e3 / inner)
        res[name] = statistics.median(times)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=sorted(VLLM_US))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--phases", action="store_true")
    ap.add_argument("--paths", action="store_true")
    ap.add_argument("--warps", type=int, default=None, help="CUDA_LAUNCH.gemv_warps")
    ap.add_argument("--blocks", type=int, default=None, help="CUDA_LAUNCH.gemv_min_blocks")
    ap.add_argument("--per-lane", type=int, default=None,
                    help="CUDA_LAUNCH.gemv_chunks_per_lane")
    ap.add_argument("--gemv-max", type=int, default=None, help="CUDA_LAUNCH.gemv_max_tokens")
    ap.add_argument("--router-max", type=int, default=None,
                    help="CUDA_LAUNCH.router_gemv_max_tokens")
    args = ap.parse_args(argv)
    # grouped launches size their grids for the worst case; idle blocks exit
    warnings.filterwarnings("ignore", message=".*Grid size")
    if args.warps:
        CUDA_LAUNCH.gemv_warps = args.warps
    if args.blocks:
        CUDA_LAUNCH.gemv_min_blocks = args.blocks
    if args.per_lane:
        CUDA_LAUNCH.gemv_chunks_per_lane = args.per_lane
    if args.gemv_max is not None:
        CUDA_LAUNCH.gemv_max_tokens = args.gemv_max
    if args.router_max is not None:
        CUDA_LAUNCH.router_gemv_max_tokens = args.router_max

    dev = cuda.get_current_device()
    print(f"device: {dev.name.decode() if isinstance(dev.name, bytes) else dev.name}")
    t0 = time.perf_counter()
    layer = build_layer().to("cuda")
    st = layer._cuda
    print(f"upload: {st.nbytes / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s")
    bw = copy_bandwidth()
    print(f"device copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")
    per_expert = sum(w.expert_nbytes() for w in (st.gate, st.up, st.down))
    rng = np.random.default_rng(1)
    rows = []
    for t in args.tokens:
        x = rng.standard_normal((t, H)).astype(np.float32)
        d_x = cuda.to_device(x)
        experts = len(np.unique(layer.route(x).expert_ids))
        nbytes = experts * per_expert + st.router.nbytes
        flops = 2 * 3 * H * I * t * K
        layer(d_x, device="cuda")          # eager warm-up + capture
        layer(d_x, device="cuda")
        ours = time_graph(st, t, args.reps)
        call = time_call(layer, d_x, max(5, args.reps // 5))
        floor = nbytes / bw
        vllm = VLLM_US.get(t)
        rows.append((t, experts, ours, call, floor, nbytes / ours / 1e9, flops / ours / 1e12, vllm))
        if args.phases:
            ph = phase_times(st, t)
            print(f"T={t}: " + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in ph.items())
                  + f" us (sum {sum(ph.values()) * 1e6:.1f})")
        if args.paths and 16 <= t <= 512:
            saved = CUDA_LAUNCH.gemv_max_tokens
            for name, lim in (("gemv", 1 << 30), ("tiled", 0)):
                CUDA_LAUNCH.gemv_max_tokens = lim
                st.graphs.clear()
                layer(d_x, device="cuda")
                layer(d_x, device="cuda")
                print(f"T={t}: {name} path {time_graph(st, t, args.reps) * 1e6:.1f} us")
            CUDA_LAUNCH.gemv_max_tokens = saved
            st.graphs.clear()
    print()
    print(f"{'T':>5} {'experts':>7} {'ours us':>9} {'call us':>9} {'floor us':>9} "
          f"{'GB/s':>7} {'TFLOP/s':>8} {'vLLM us':>8} {'vLLM/ours':>9}")
    for t, ex, ours, call, floor, gbs, tf, vllm in rows:
        ratio = f"{vllm / (ours * 1e6):9.2f}" if vllm else f"{'-':>9}"
        print(f"{t:5d} {ex:7d} {ours * 1e6:9.1f} {call * 1e6:9.1f} {floor * 1e6:9.1f} "
              f"{gbs:7.0f} {tf:8.2f} {vllm or '-':>8} {ratio}")


if __name__ == "__main__":
    main()

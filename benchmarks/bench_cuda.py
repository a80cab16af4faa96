"""GPU benchmark of one Qwen3-30B-A3B MoE layer: ``layer(x, device="cuda")``.

Layer: H=2048, I=768, E=128, K=8, gate/up Q4_K, down Q6_K (what Q4_K_M
files hold), written with ``write_moe_gguf(init="random_blocks")`` into a
temporary directory: the same layer ``benchmarks/bench_cpu.py`` times.
For each token count T it prints, in one run on one card:

* ``ours``: device time of one forward (router, top-k, plan, both GEMMs,
  combine) replayed from its CUDA graph, CUDA events, median of many;
* ``cold``: the same with the L2 cache flushed before each replay
  (:class:`~numba_moe.bench.CacheFlush`), as a model's next layer finds
  it: back-to-back replays of one input find up to 50 MB of its experts
  still in an H100's L2 (all of them at T=1), a cache state that a real
  decode never sees.  Both columns are reported, and vLLM's ratio against each;
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
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
from numba import cuda

import numba_moe as nm
from numba_moe.bench import QWEN3_30B_A3B, CacheFlush, cuda_copy_bandwidth, cuda_event_seconds
from numba_moe.config import CUDA_LAUNCH
from numba_moe.cuda.graph import CapturedGraph

H, I, K = (QWEN3_30B_A3B[k] for k in ("hidden_size", "expert_intermediate", "top_k"))
#: vLLM fused_moe (bf16, H100), microseconds, routing excluded.
VLLM_US = {1: 44, 4: 113, 16: 283, 64: 424, 512: 476, 4096: 940}


def time_graph(st, t, reps, flush=None) -> float:
    """Median device seconds of one graph replay for T=t (graph already
    captured); with ``flush`` (a :class:`~numba_moe.bench.CacheFlush`) the L2
    cache is flushed before each."""
    return cuda_event_seconds(st.graphs[t].replay, reps, st.stream, before=flush)


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
        res[name] = cuda_event_seconds(graph.replay, reps, st.stream, inner)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=sorted(set(VLLM_US) | {128}))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--phases", action="store_true")
    ap.add_argument("--paths", action="store_true")
    ap.add_argument("--warps", type=int, default=None, help="CUDA_LAUNCH.gemv_warps")
    ap.add_argument("--blocks", type=int, default=None, help="CUDA_LAUNCH.gemv_min_blocks")
    ap.add_argument("--per-lane", type=int, default=None,
                    help="CUDA_LAUNCH.gemv_chunks_per_lane")
    ap.add_argument("--gemv-max", type=int, default=None,
                    help="CUDA_LAUNCH.gemv_max_tokens and gemv_max_tokens_fp16")
    ap.add_argument("--router-max", type=int, default=None,
                    help="CUDA_LAUNCH.router_gemv_max_tokens")
    ap.add_argument("--tile-m", type=int, default=None,
                    help="CUDA_LAUNCH.tile_m (tokens of a tiled block, the plan's block size)")
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
        CUDA_LAUNCH.gemv_max_tokens = CUDA_LAUNCH.gemv_max_tokens_fp16 = args.gemv_max
    if args.router_max is not None:
        CUDA_LAUNCH.router_gemv_max_tokens = args.router_max
    if args.tile_m:
        CUDA_LAUNCH.tile_m = args.tile_m

    dev = cuda.get_current_device()
    print(f"device: {dev.name.decode() if isinstance(dev.name, bytes) else dev.name}")
    tmp = tempfile.TemporaryDirectory()
    path = nm.write_moe_gguf(os.path.join(tmp.name, "qwen3moe_layer.gguf"),
                             init="random_blocks", seed=0, **QWEN3_30B_A3B)
    t0 = time.perf_counter()
    layer = nm.load_moe_layer(path, 0).to("cuda")
    st = layer._cuda
    print(f"upload: {st.nbytes / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s")
    bw = cuda_copy_bandwidth()
    print(f"device copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")
    per_expert = sum(w.expert_nbytes() for w in (st.gate, st.up, st.down))
    flush = CacheFlush(st.stream)
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
        cold = time_graph(st, t, args.reps, flush)
        call = time_call(layer, d_x, max(5, args.reps // 5))
        floor = nbytes / bw
        vllm = VLLM_US.get(t)
        rows.append((t, experts, ours, cold, call, floor, nbytes / ours / 1e9, flops / ours / 1e12,
                     vllm))
        if args.phases:
            ph = phase_times(st, t)
            print(f"T={t}: " + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in ph.items())
                  + f" us (sum {sum(ph.values()) * 1e6:.1f})")
        if args.paths and 16 <= t <= 512:
            saved = CUDA_LAUNCH.gemv_max_tokens, CUDA_LAUNCH.gemv_max_tokens_fp16
            for name, lim in (("gemv", 1 << 30), ("tiled", 0)):
                CUDA_LAUNCH.gemv_max_tokens = CUDA_LAUNCH.gemv_max_tokens_fp16 = lim
                st.graphs.clear()
                layer(d_x, device="cuda")
                layer(d_x, device="cuda")
                print(f"T={t}: {name} path {time_graph(st, t, args.reps) * 1e6:.1f} us")
            CUDA_LAUNCH.gemv_max_tokens, CUDA_LAUNCH.gemv_max_tokens_fp16 = saved
            st.graphs.clear()
    print()
    print(f"{'T':>5} {'experts':>7} {'ours us':>9} {'cold us':>9} {'call us':>9} "
          f"{'floor us':>9} {'GB/s':>7} {'TFLOP/s':>8} {'vLLM us':>8} {'vLLM/ours':>9} "
          f"{'vLLM/cold':>9}")
    for t, ex, ours, cold, call, floor, gbs, tf, vllm in rows:
        ratios = "".join(f"{vllm / (v * 1e6):10.2f}" if vllm else f"{'-':>10}"
                         for v in (ours, cold))
        print(f"{t:5d} {ex:7d} {ours * 1e6:9.1f} {cold * 1e6:9.1f} {call * 1e6:9.1f} "
              f"{floor * 1e6:9.1f} {gbs:7.0f} {tf:8.2f} {vllm or '-':>8}{ratios}")


if __name__ == "__main__":
    main()

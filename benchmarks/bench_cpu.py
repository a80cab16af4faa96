"""CPU MoE forward on a Qwen3-30B-A3B-sized layer: ours vs numpy vs the memory floor.

Layer: H=2048, I=768, E=128, K=8, gate/up Q4_K, down Q6_K (what Q4_K_M
files hold; ~390 MB), written with ``write_moe_gguf(init="random_blocks")``
into a temporary directory; the router is random, so experts are spread.
For each token count T the script prints (see :mod:`numba_moe.bench`)

* ``ours``: median wall time of ``layer(x)`` (router included), a fresh
  random ``x`` per call so the touched experts change (no warm L3);
* ``numpy``: a naive float32 reference with the experts dequantized once
  outside the timing, one BLAS matmul chain per active expert;
* ``floor``: bytes of the distinct experts touched divided by the streaming
  read bandwidth measured in this run;
* ``llama.cpp``: MUL_MAT_ID times measured on the CI machine kind (2 threads);
* what bounds each size: the phase split of one profiled call
  (``NUMBA_MOE_PROFILE`` timers) and ``ours/floor``.

Numba compile time (the first call) is reported separately.  Timings on a
machine other processes are using are meaningless (the parallel kernels
wait for a free core); run it on an idle one::

    python benchmarks/bench_cpu.py [--tokens 1 4 16 64 512] [--reps 20] [--no-numpy]

``NUMBA_MOE_SIMD=0`` times the portable kernels on an AVX-512 host
(:mod:`numba_moe.cpu.simd`).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numba
import numpy as np

import numba_moe as nm
from numba_moe import config, profile
from numba_moe.bench import QWEN3_30B_A3B, bench_rows, stream_bandwidth
from numba_moe.cpu.gemm import _down_kernel, _gate_up_kernel
from numba_moe.cpu.simd import simd_flag

# llama.cpp MUL_MAT_ID, same layer and machine kind, 2 threads (ms per layer).
LLAMA_CPP_MS = {1: 1.60, 4: 7.3, 16: 51.6, 64: 158.0, 512: 446.0}


def phase_split(layer, num_tokens, seed=1):
    """Seconds per phase of one profiled forward of ``num_tokens`` random tokens."""
    x = np.random.default_rng(seed).standard_normal((num_tokens, layer.hidden_size),
                                                    dtype=np.float32)
    with config.override(profile=True):
        profile.reset()
        layer(x)
        split = {p: v["seconds"] for p, v in profile.snapshot().items()}
    profile.reset()
    return split


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 512])
    ap.add_argument("--reps", type=int, default=20, help="timed calls per size (T>=256: a quarter)")
    ap.add_argument("--no-numpy", action="store_true", help="skip the numpy reference")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "qwen3moe_layer.gguf")
        t0 = time.perf_counter()
        nm.write_moe_gguf(path, init="random_blocks", seed=0, **QWEN3_30B_A3B)
        layer = nm.load_moe_layer(path, 0)
        print(f"{layer}: {os.path.getsize(path) / 1e6:.0f} MB, written in "
              f"{time.perf_counter() - t0:.1f} s")

        t0 = time.perf_counter()
        layer(np.zeros((2, layer.hidden_size), dtype=np.float32))
        first = time.perf_counter() - t0
        cached = any(k.stats.cache_hits for k in (_gate_up_kernel, _down_kernel))
        print(f"numba {numba.__version__}, {numba.get_num_threads()} threads "
              f"({numba.threading_layer()}); first call {first:.1f} s "
              f"({'kernels loaded from the cache' if cached else 'Numba compile'}); "
              f"{'AVX-512' if simd_flag() else 'portable'} CPU kernels")

        bw = stream_bandwidth()
        print(f"streaming read bandwidth: {bw / 1e9:.1f} GB/s")
        # bench_rows times ours at every T before any numpy reference (whose
        # OpenBLAS threads keep spinning and would slow the Numba kernels),
        # with inputs drawn apart from the writer's seed.
        rows = bench_rows(layer, args.tokens, reps=args.reps, numpy_ref=not args.no_numpy,
                          bandwidth=bw)

        print()
        hdr = (f"{'T':>4} {'ours ms':>9} {'GB/s':>6} {'numpy ms':>9} {'floor ms':>9} "
               f"{'ours/floor':>10} {'numpy/ours':>10} {'llama.cpp':>9} {'llama/ours':>10}")
        print(hdr)
        print("-" * len(hdr))
        for r in rows:
            ll = LLAMA_CPP_MS.get(r["T"], np.nan)
            ours = r["ours"]
            print(f"{r['T']:>4} {ours * 1e3:>9.2f} {r['bytes'] / ours / 1e9:>6.1f} "
                  f"{r['numpy'] * 1e3:>9.2f} {r['floor'] * 1e3:>9.2f} {ours / r['floor']:>10.2f} "
                  f"{r['numpy'] / ours:>10.1f} {ll:>9.1f} {ll / (ours * 1e3):>10.2f}")
        print()
        print("phase split of one profiled call (ms):")
        print(f"{'T':>4} " + " ".join(f"{p:>8}" for p in profile.PHASES))
        for r in rows:
            split = phase_split(layer, r["T"])
            print(f"{r['T']:>4} " + " ".join(f"{split.get(p, 0.0) * 1e3:>8.2f}"
                                              for p in profile.PHASES))
        del layer


if __name__ == "__main__":
    main()

"""CPU MoE forward on a Qwen3-30B-A3B-sized layer: ours vs numpy vs the memory floor.

Layer: H=2048, I=768, E=128, K=8, gate/up Q4_K, down Q6_K (what Q4_K_M
files hold; ~390 MB), written with ``write_moe_gguf(init="random_blocks")``
into a temporary directory.  For each token count T the script prints

* ``ours``: median time of ``layer(x)`` (router included), a fresh random
  ``x`` per call so the touched experts change (no warm L3);
* ``numpy``: a naive float32 reference with the experts dequantized once
  outside the timing, one BLAS matmul chain per active expert;
* ``floor``: bytes of the distinct experts touched divided by the streaming
  read bandwidth measured in this run (a parallel ``@njit`` sum over 1 GiB);
* ``llama.cpp``: MUL_MAT_ID times measured on the CI machine kind (2 threads);
* the phase split of one profiled call (``NUMBA_MOE_PROFILE`` timers).

Numba compile time (first call) is reported separately.  Usage::

    python benchmarks/bench_cpu.py [--tokens 1 4 16 64 512] [--reps 20] [--no-numpy]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numba
import numpy as np
from numba import njit, prange

import numba_moe as nm
from numba_moe import config, profile
from numba_moe.cpu.forward import touched_expert_bytes
from numba_moe.cpu.gemm import _down_kernel, _gate_up_kernel

# llama.cpp MUL_MAT_ID, same layer and machine kind, 2 threads (ms per layer).
LLAMA_CPP_MS = {1: 1.60, 4: 7.3, 16: 51.6, 64: 158.0, 512: 446.0}
SHAPE = dict(hidden_size=2048, expert_intermediate=768, num_experts=128, top_k=8,
             gate_type="Q4_K", up_type="Q4_K", down_type="Q6_K")


@njit(parallel=True, cache=True)
def _stream_sum(a, nchunks):
    n = a.shape[0] // nchunks
    total = np.uint64(0)
    for c in prange(nchunks):
        part = a[c * n:(c + 1) * n]
        acc = np.uint64(0)
        for i in range(part.shape[0]):
            acc += part[i]
        total += acc
    return total


def stream_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Best-of-``reps`` read bandwidth (bytes/s) of a parallel sum over ``nbytes``."""
    a = np.ones(nbytes // 8, dtype=np.uint64)
    chunks = 64 * numba.get_num_threads()
    _stream_sum(a, chunks)
    best = np.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        _stream_sum(a, chunks)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def numpy_forward(dense, layer, x):
    """Naive float32 forward: per active expert, (silu(X Wg^T) * X Wu^T) Wd^T."""
    wg, wu, wd = dense
    r = layer.route(x)
    out = np.zeros_like(x)
    for e in np.unique(r.expert_ids):
        tok, kk = np.nonzero(r.expert_ids == e)
        xs = x[tok]
        g = xs @ wg[e].T
        h = g / (1.0 + np.exp(-g)) * (xs @ wu[e].T)
        np.add.at(out, tok, r.expert_weights[tok, kk][:, None] * (h @ wd[e].T))
    return out


def median_time(fn, inputs, reps):
    ts = []
    for i in range(reps):
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 512])
    ap.add_argument("--reps", type=int, default=20, help="timed calls per size (T=512: a quarter)")
    ap.add_argument("--no-numpy", action="store_true", help="skip the numpy reference")
    args = ap.parse_args(argv)

    print(f"numba {numba.__version__}, threads {numba.get_num_threads()}, "
          f"threading layer {numba.threading_layer() if False else '(first launch)'}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "qwen3moe_layer.gguf")
        t0 = time.perf_counter()
        nm.write_moe_gguf(path, "qwen3moe", init="random_blocks", seed=0, **SHAPE)
        layer = nm.load_moe_layer(path, 0)
        print(f"layer: {layer}  ({os.path.getsize(path) / 1e6:.0f} MB, written in "
              f"{time.perf_counter() - t0:.1f} s)")
        rng = np.random.default_rng(0)
        H = layer.hidden_size

        t0 = time.perf_counter()
        layer(rng.standard_normal((2, H)).astype(np.float32))
        first = time.perf_counter() - t0
        hits = sum(k.stats.cache_hits.get(s, 0) for k in (_gate_up_kernel, _down_kernel)
                   for s in k.signatures)
        print(f"first call (Numba compile, or cache load when cached): {first:.1f} s "
              f"({'from cache' if hits else 'compiled'}); threading layer {numba.threading_layer()}")

        bw = stream_bandwidth()
        print(f"streaming read bandwidth: {bw / 1e9:.1f} GB/s")

        dense = None
        if not args.no_numpy:
            t0 = time.perf_counter()
            dense = (layer.gate.dense(), layer.up.dense(), layer.down.dense())
            print(f"numpy reference: experts dequantized to float32 in "
                  f"{time.perf_counter() - t0:.1f} s (outside the timing)")

        rows = []
        for T in args.tokens:
            reps = max(3, args.reps // 4) if T >= 256 else args.reps
            inputs = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(min(reps, 8))]
            layer(inputs[0])
            ours = median_time(layer, inputs, reps)
            touched = np.mean([touched_expert_bytes(layer, layer.route(x).expert_ids)
                               for x in inputs])
            floor = touched / bw
            ref = median_time(lambda x: numpy_forward(dense, layer, x), inputs,
                              max(3, reps // 4)) if dense is not None else np.nan
            with config.override(profile=True):
                profile.reset()
                layer(inputs[-1])
                split = profile.snapshot()
            profile.reset()
            rows.append((T, ours, ref, floor, touched, split))

        print()
        hdr = (f"{'T':>4} {'ours ms':>9} {'GB/s':>6} {'numpy ms':>9} {'floor ms':>9} "
               f"{'ours/floor':>10} {'numpy/ours':>10} {'llama.cpp':>9} {'llama/ours':>10}")
        print(hdr)
        print("-" * len(hdr))
        for T, ours, ref, floor, touched, _ in rows:
            ll = LLAMA_CPP_MS.get(T, np.nan)
            print(f"{T:>4} {ours * 1e3:>9.2f} {touched / ours / 1e9:>6.1f} {ref * 1e3:>9.2f} "
                  f"{floor * 1e3:>9.2f} {ours / floor:>10.2f} {ref / ours:>10.1f} "
                  f"{ll:>9.1f} {ll / (ours * 1e3):>10.2f}")
        print()
        print("phase split of one profiled call (ms):")
        print(f"{'T':>4} " + " ".join(f"{p:>8}" for p in profile.PHASES))
        for T, *_, split in rows:
            print(f"{T:>4} " + " ".join(f"{split.get(p, {}).get('seconds', 0) * 1e3:>8.2f}"
                                        for p in profile.PHASES))


if __name__ == "__main__":
    main()

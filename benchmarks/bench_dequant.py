"""Dequantization throughput: numba_moe.quants vs gguf.quants.

For each native type, tiles realistic blocks (gaussian weights quantized by
``numba_moe.quants.quantize``) up to ``--mb`` MB of block bytes, then times
best-of-N:

* ``ours``: ``numba_moe.quants.dequantize`` (allocates its float32 output,
  so first-touch page faults of the output are included, as for gguf),
* ``ours (kernel)``: the parallel driver writing into a preallocated output,
* ``gguf``: ``gguf.quants.dequantize``.

Throughput is reported as GB/s of block bytes read and Mvalues/s written.
The first call of each driver (JIT compile, or load from Numba's on-disk
cache) is timed separately and not part of the throughput.

Usage::

    python benchmarks/bench_dequant.py [--mb 64] [--repeat 5] [--gguf-repeat 2]
"""
import argparse
import importlib.metadata
import os
import platform
import time

import gguf
import numba
import numpy as np

import numba_moe.quants as q
from numba_moe.quants import dequant as dequant_mod

T = gguf.GGMLQuantizationType


def best_of(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def make_blocks(name, total_bytes):
    values, nbytes = gguf.GGML_QUANT_SIZES[T[name]]
    row_values = 4096
    row_bytes = row_values // values * nbytes
    seed_rows = 64
    x = (np.random.default_rng(0).standard_normal((seed_rows, row_values)) * 0.02).astype(np.float32)
    seed = q.quantize(x, name)
    n_rows = max(seed_rows, total_bytes // row_bytes)
    return np.ascontiguousarray(np.resize(seed, (n_rows, row_bytes)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=64.0, help="MB of block bytes per type (default 64)")
    ap.add_argument("--repeat", type=int, default=5, help="best-of-N for numba_moe (default 5)")
    ap.add_argument("--gguf-repeat", type=int, default=2, help="best-of-N for gguf (default 2)")
    ap.add_argument("--types", default="Q4_K,Q5_K,Q6_K,Q8_0")
    args = ap.parse_args()

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cpus, "
          f"numba {numba.__version__} with {numba.get_num_threads()} threads, "
          f"numpy {np.__version__}, gguf {importlib.metadata.version('gguf')}")
    print(f"blocks: {args.mb:g} MB per type, best of {args.repeat} (ours) / {args.gguf_repeat} (gguf)\n")

    first_calls = []
    rows = []
    for name in args.types.split(","):
        qt = T[name]
        values, nbytes = gguf.GGML_QUANT_SIZES[qt]
        driver = dequant_mod._NATIVE_DRIVERS[qt]
        one = make_blocks(name, 0)[:1, :nbytes]
        t0 = time.perf_counter()
        q.dequantize(one, name)
        first_calls.append((name, time.perf_counter() - t0, driver.stats.cache_hits, driver.stats.cache_misses))

        blocks = make_blocks(name, int(args.mb * 1e6))
        n_values = blocks.shape[0] * (blocks.shape[1] // nbytes) * values
        flat = blocks.reshape(-1, nbytes)
        out = np.empty((flat.shape[0], values), np.float32)

        t_ours = best_of(lambda: q.dequantize(blocks, name), args.repeat)
        t_kernel = best_of(lambda: driver(flat, out), args.repeat)
        with np.errstate(all="ignore"):
            t_gguf = best_of(lambda: gguf.quants.dequantize(blocks, qt), args.gguf_repeat)
            same = np.array_equal(q.dequantize(blocks, name), gguf.quants.dequantize(blocks, qt), equal_nan=True)
        for label, t in (("ours", t_ours), ("ours (kernel)", t_kernel), ("gguf", t_gguf)):
            rows.append((name, label, blocks.nbytes / t / 1e9, n_values / t / 1e6, t_gguf / t, same))

    print("| type | impl | GB/s blocks | Mvalues/s | vs gguf | bit-exact |")
    print("|---|---|---:|---:|---:|---|")
    for name, label, gbs, mvs, speedup, same in rows:
        print(f"| {name} | {label} | {gbs:.2f} | {mvs:.0f} | {speedup:.1f}x | {'yes' if same else 'NO'} |")
    print("\nfirst call (1 block; Numba JIT compile, or cache load when hits > 0):")
    print("| type | first call s | cache hits | cache misses |")
    print("|---|---:|---:|---:|")
    for name, t, hits, misses in first_calls:
        print(f"| {name} | {t:.2f} | {sum(hits.values())} | {sum(misses.values())} |")


if __name__ == "__main__":
    main()

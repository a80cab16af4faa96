"""Load a Qwen3-30B-A3B-shaped MoE layer: time, resident memory, expert bytes.

Writes one layer shaped like Qwen3-30B-A3B (H=2048, I=768, E=128, K=8;
gate/up Q4_K, down Q6_K, as in Q4_K_M files; ~390 MB of random but valid
blocks) to a temporary directory, then loads it and prints:

* the file size and the bytes of the expert tensors (all, and per expert);
* resident memory before and after the load, split into anonymous memory
  (copies) and mapped file pages (``/proc/self/status`` RssAnon / RssFile):
  a zero-copy load adds about the router (E*H float32 = 1 MiB) to the first
  and next to nothing to the second;
* the load time (first load, then the median of repeated loads), and the
  part of it spent in the header bounds check (``gguf_io._check_header``);
* the first forward at T=1 and then at T=64 (kernels warmed up on a small
  layer beforehand): time and resident-memory growth.  The kernels read only
  the routed experts' blocks, but the OS maps file pages around every
  touched page, so RssFile grows by more than the bytes read.

Usage::

    python benchmarks/bench_load.py [--dir DIR] [--repeat 10]
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

import numba_moe as nm
from numba_moe.gguf_io import _check_header

MiB = 2**20
SHAPE = dict(arch="qwen3moe", hidden_size=2048, expert_intermediate=768, num_experts=128,
             top_k=8, gate_type="Q4_K", up_type="Q4_K", down_type="Q6_K")


def rss():
    """(anonymous, file-backed) resident bytes of this process (Linux)."""
    out = {"RssAnon": 0, "RssFile": 0}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in out:
                out[key] = int(rest.split()[0]) * 1024
    return out["RssAnon"], out["RssFile"]


def fmt_rss(r):
    return f"anon {r[0] / MiB:8.1f} MiB   file {r[1] / MiB:8.1f} MiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", help="directory for the model file (kept); default a temp dir")
    p.add_argument("--repeat", type=int, default=10, help="repeated loads to time")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or tmp
        path = os.path.join(directory, "qwen3_30b_a3b_layer.gguf")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, python "
              f"{platform.python_version()}, numpy {np.__version__}")
        if not os.path.exists(path):
            t0 = time.perf_counter()
            nm.write_moe_gguf(path, init="random_blocks", seed=0, **SHAPE)
            print(f"wrote {path} in {time.perf_counter() - t0:.2f} s")
        # Compile (or load from Numba's cache) the forward kernels on a small
        # layer of the same types first, so that no number below includes JIT.
        t0 = time.perf_counter()
        small = nm.write_moe_gguf(os.path.join(directory, "warmup.gguf"),
                                  **dict(SHAPE, hidden_size=256, expert_intermediate=256))
        warm = nm.load_moe_layer(small)
        for T in (1, 64):
            warm(np.ones((T, 256), np.float32))
        print(f"kernel warm-up (JIT or cache load) on a small layer: "
              f"{time.perf_counter() - t0:.1f} s")
        del warm
        gc.collect()
        size = os.path.getsize(path)
        print(f"file size: {size / MiB:.1f} MiB")

        before = rss()
        t0 = time.perf_counter()
        layer = nm.load_moe_layer(path)
        first = time.perf_counter() - t0
        after = rss()
        expert_bytes = sum(t.nbytes for t in layer.expert_tensors)
        print(f"{layer!r}")
        print(f"expert tensors: {expert_bytes / MiB:.1f} MiB "
              f"({expert_bytes / size:.1%} of the file), one expert "
              f"{layer.expert_bytes() / MiB:.3f} MiB, router {layer.router.nbytes / MiB:.2f} MiB")
        print(f"RSS before load:  {fmt_rss(before)}")
        print(f"RSS after load:   {fmt_rss(after)}")
        print(f"RSS growth:       anon {(after[0] - before[0]) / MiB:+.1f} MiB   "
              f"file {(after[1] - before[1]) / MiB:+.1f} MiB   "
              f"(file is {size / MiB:.1f} MiB)")

        times, checks = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            _check_header(path)
            checks.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            nm.load_moe_layer(path)
            times.append(time.perf_counter() - t0)
        print(f"load time: first {first * 1e3:.2f} ms, median of {args.repeat} "
              f"{statistics.median(times) * 1e3:.2f} ms "
              f"(header bounds check {statistics.median(checks) * 1e3:.3f} ms)")

        rng = np.random.default_rng(0)
        for T in (1, 64):
            x = rng.standard_normal((T, layer.hidden_size)).astype(np.float32)
            distinct = np.unique(layer.route(x).expert_ids).size
            b = rss()
            t0 = time.perf_counter()
            layer(x)
            dt = time.perf_counter() - t0
            a = rss()
            print(f"forward T={T:<3} ({distinct:3d} distinct experts, "
                  f"{distinct * layer.expert_bytes() / MiB:6.1f} MiB of blocks): "
                  f"{dt * 1e3:8.1f} ms, "
                  f"RSS anon {(a[0] - b[0]) / MiB:+.1f} MiB, file {(a[1] - b[1]) / MiB:+.1f} MiB")
        del layer
    return 0


if __name__ == "__main__":
    sys.exit(main())

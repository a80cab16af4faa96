"""Benchmark helpers shared by ``numba-moe bench`` and ``benchmarks/bench_cpu.py``.

What one row measures, for T tokens (a fresh random ``x`` per call so the
touched experts change between calls):

* **ours**: median wall time of ``layer(x, device=...)``, router included;
* **numpy**: a naive float32 reference, experts dequantized once outside the
  timing, one BLAS matmul chain per active expert;
* **floor**: bytes of the distinct experts touched divided by a streaming
  read bandwidth measured in the same run (the memory-bound lower limit);
* the ratios ``ours/floor`` (1.0 is perfect) and ``numpy/ours`` (speed-up).
"""
from __future__ import annotations

import os
import tempfile
import time

import numba
import numpy as np
from numba import njit, prange

__all__ = ["QWEN3_30B_A3B", "stream_bandwidth", "cuda_event_seconds", "CacheFlush",
           "cuda_copy_bandwidth", "numpy_forward", "median_time", "bench_rows",
           "markdown_table", "run_cli_bench"]

#: The reference workload of SPEC §6: one Qwen3-30B-A3B MoE layer as Q4_K_M holds it.
QWEN3_30B_A3B = dict(arch="qwen3moe", hidden_size=2048, expert_intermediate=768,
                     num_experts=128, top_k=8, gate_type="Q4_K", up_type="Q4_K",
                     down_type="Q6_K")


@njit(parallel=True, cache=True)
def _stream_sum(a, nchunks):
    n = a.shape[0] // nchunks
    total = np.uint64(0)
    for c in prange(nchunks):
        # A slice per chunk: LLVM vectorizes a loop over a whole array view,
        # not over an index range of the parent (3x less bandwidth measured).
        part = a[c * n:(c + 1) * n]
        acc = np.uint64(0)
        for i in range(part.shape[0]):
            acc += part[i]
        total += acc
    return total


def stream_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Best-of-``reps`` CPU read bandwidth in bytes/s (a parallel sum over ``nbytes``)."""
    from .threading_guard import parallel_launch

    a = np.ones(nbytes // 8, dtype=np.uint64)
    chunks = 64 * numba.get_num_threads()
    best = np.inf
    with parallel_launch():
        _stream_sum(a, chunks)
        for _ in range(reps):
            t0 = time.perf_counter()
            _stream_sum(a, chunks)
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def cuda_event_seconds(fn, reps: int, stream=0, inner: int = 1, before=None) -> float:
    """Median device seconds of ``fn()`` between two CUDA events on ``stream``.

    ``fn`` is timed ``reps`` times; with ``inner > 1`` it is assumed to run the
    measured work ``inner`` times back to back, and the time is divided by it.
    ``before()``, if given, runs ahead of each timing, outside the events
    (e.g. a :class:`CacheFlush`).
    """
    from numba import cuda

    times = []
    for _ in range(reps):
        if before is not None:
            before()
        a, b = cuda.event(), cuda.event()
        a.record(stream)
        fn()
        b.record(stream)
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / inner)
    return float(np.median(times))


class CacheFlush:
    """A device copy of ``nbytes`` on ``stream``, to evict the GPU's L2 cache
    between timings: calling the object enqueues it.

    Replaying one forward on one input leaves that input's experts in L2
    for the next replay (an H100's holds 50 MB: the experts of one or two
    tokens of a Qwen3-30B-A3B layer), which a model's next layer, whose
    weights are others, never finds.  The default 256 MB is over
    twice the L2 of any current NVIDIA GPU.
    """

    def __init__(self, stream, nbytes: int = 256 << 20):
        from numba import cuda

        self._src = cuda.device_array(nbytes, dtype=np.uint8, stream=stream)
        self._dst = cuda.device_array(nbytes, dtype=np.uint8, stream=stream)
        self._stream = stream

    def __call__(self) -> None:
        self._dst.copy_to_device(self._src, stream=self._stream)


def cuda_copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """GPU device-to-device copy bandwidth in bytes/s (read + write), median of ``reps``."""
    from numba import cuda

    src = cuda.device_array(nbytes, dtype=np.uint8)
    dst = cuda.device_array(nbytes, dtype=np.uint8)
    dst.copy_to_device(src)
    return 2 * nbytes / cuda_event_seconds(lambda: dst.copy_to_device(src), reps)


def numpy_forward(dense, layer, x):
    """Naive float32 MoE forward on dequantized experts.

    Parameters
    ----------
    dense : tuple of numpy.ndarray
        ``(gate [E,I,H], up [E,I,H], down [E,H,I])`` float32.
    layer : MoELayer
        For routing (and the shared expert, which this reference skips).
    x : numpy.ndarray
        float32 [T, H].
    """
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


def median_time(fn, inputs, reps: int, sync=None) -> float:
    """Median seconds of ``fn(x)`` over ``reps`` calls cycling through ``inputs``."""
    ts = []
    for i in range(reps):
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        fn(x)
        if sync is not None:
            sync()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def bench_rows(layer, tokens, *, device="cpu", reps=20, numpy_ref=True, bandwidth=None,
               seed=12345):
    """Time ``layer`` at each token count.

    ``seed`` draws the inputs; keep it apart from the writer's seed, or the
    first input rows equal router rows and every token picks the same experts.

    Returns
    -------
    list of dict
        Keys ``T, ours, numpy, floor, bytes`` (seconds and bytes; ``numpy``
        NaN when skipped).
    """
    from .cpu.forward import touched_expert_bytes

    rng = np.random.default_rng(seed)
    H = layer.hidden_size
    sync = None
    if device == "cuda":
        from numba import cuda

        layer.to("cuda")
        sync = cuda.synchronize
    bw = bandwidth if bandwidth is not None else stream_bandwidth()
    rows, inputs_of = [], {}
    # All of ours first: numpy's BLAS leaves its threads spinning after each
    # call, which would slow whatever Numba kernel runs next on a small machine.
    for T in tokens:
        n = max(3, reps // 4) if T >= 256 else reps
        inputs = [rng.standard_normal((T, H), dtype=np.float32) for _ in range(min(n, 8))]
        layer(inputs[0], device=device)  # warm-up: compile, grow scratch, capture graphs
        ours = median_time(lambda x: layer(x, device=device), inputs, n, sync)
        touched = float(np.mean([touched_expert_bytes(layer, layer.route(x).expert_ids)
                                 for x in inputs]))
        rows.append(dict(T=T, ours=ours, numpy=float("nan"), floor=touched / bw, bytes=touched))
        inputs_of[T] = (inputs, n)
    if numpy_ref:
        dense = (layer.gate.dense(), layer.up.dense(), layer.down.dense())
        for row in rows:
            inputs, n = inputs_of[row["T"]]
            row["numpy"] = median_time(lambda x: numpy_forward(dense, layer, x), inputs,
                                       max(3, n // 4))
    return rows


def markdown_table(layer, rows, device: str, bandwidth: float) -> str:
    """The rows as a llama-bench-style markdown table."""
    size = sum(t.nbytes for t in layer.expert_tensors) / 2**20
    types = "/".join(t.qtype.name for t in (layer.gate, layer.up, layer.down))
    threads = numba.get_num_threads() if device == "cpu" else "-"
    how = "CPU streaming read" if device == "cpu" else "GPU device copy"
    lines = [f"floor = bytes of distinct experts touched / {bandwidth / 1e9:.1f} GB/s ({how})",
             "",
             "| layer | types | size MiB | device | threads | T | ours ms | GB/s | numpy ms "
             "| floor ms | ours/floor | numpy/ours |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    name = (f"{layer.arch} E{layer.num_experts} K{layer.top_k} "
            f"H{layer.hidden_size} I{layer.expert_intermediate}")
    for r in rows:
        lines.append(
            f"| {name} | {types} | {size:.0f} | {device} | {threads} | {r['T']} | "
            f"{r['ours'] * 1e3:.3f} | {r['bytes'] / r['ours'] / 1e9:.1f} | "
            f"{r['numpy'] * 1e3:.3f} | {r['floor'] * 1e3:.3f} | {r['ours'] / r['floor']:.2f} | "
            f"{r['numpy'] / r['ours']:.1f} |")
    return "\n".join(lines)


def run_cli_bench(args) -> int:
    """``numba-moe bench``: build or load the layer, print the table."""
    import numba_moe as nm
    from .default_model import default_model_path
    from .errors import MoEError

    try:
        tokens = [int(t) for t in str(args.tokens).split(",") if t.strip()]
    except ValueError:
        raise MoEError(f"--tokens {args.tokens!r}: expected comma-separated integers") from None
    if not tokens or min(tokens) < 1:
        raise MoEError(f"--tokens {args.tokens!r}: expected token counts >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        if args.gguf:
            from .cli import _first_moe_layer

            path = args.gguf
            idx = args.layer if args.layer is not None else _first_moe_layer(path)
        elif args.shape == "qwen3-30b-a3b":
            path = os.path.join(tmp, "qwen3-30b-a3b-layer.gguf")
            print("writing a Qwen3-30B-A3B-shaped layer (random valid Q4_K/Q6_K blocks, "
                  "about 390 MB) ...", flush=True)
            nm.write_moe_gguf(path, init="random_blocks", **QWEN3_30B_A3B)
            idx = 0
        else:
            path, idx = default_model_path(announce=True), 0
        layer = nm.load_moe_layer(path, idx)
        print(f"{layer}", flush=True)
        bw = stream_bandwidth() if args.device == "cpu" else cuda_copy_bandwidth()
        rows = bench_rows(layer, tokens, device=args.device, bandwidth=bw)
        print(markdown_table(layer, rows, args.device, bw))
        del layer
    return 0

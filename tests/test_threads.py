"""Concurrency: layers and routing called from several Python threads at once.

Results must equal serial calls exactly (each call is deterministic and the
per-layer workspace is never shared between two running calls), and nothing
may abort.  Numba's ``workqueue`` threading layer aborts the process on
concurrent parallel launches; :mod:`numba_moe.threading_guard` serializes
launches under it.  This machine's layer is checked in-process; the
``workqueue`` cases run in a subprocess with ``NUMBA_THREADING_LAYER``
forced, so an abort shows as an exit status instead of killing pytest.
"""
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import numba_moe as nm
from numba_moe import threading_guard

THREADS = 4
CALLS = 6
TOKENS = (1, 3, 17, 64, 5, 200)


@pytest.fixture(scope="module")
def layers(make_model):
    return [nm.load_moe_layer(make_model("qwen3moe", arch="qwen3moe")),
            nm.load_moe_layer(make_model("thr_qwen2moe", arch="qwen2moe", fused_gate_up=True))]


def _inputs(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((TOKENS[i % len(TOKENS)], 256)).astype(np.float32)
            for i in range(n)]


def _run_threads(jobs):
    """Run ``jobs`` (callables) on THREADS threads, all released together."""
    start = threading.Barrier(THREADS)

    def run(chunk):
        start.wait()
        return [job() for job in chunk]

    chunks = [jobs[i::THREADS] for i in range(THREADS)]
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(run, chunks))
    out = [None] * len(jobs)
    for i, res in enumerate(results):
        out[i::THREADS] = res
    return out


def test_threading_layer_is_known():
    assert threading_guard.threading_layer() in ("tbb", "omp", "workqueue")
    layer = threading_guard.threading_layer()
    assert threading_guard.serializes_launches() is (layer == "workqueue")


def test_same_layer_from_many_threads(layers):
    layer = layers[0]
    xs = _inputs(THREADS * CALLS, seed=1)
    serial = [layer(x) for x in xs]
    concurrent = _run_threads([lambda x=x: layer(x) for x in xs])
    for a, b in zip(serial, concurrent):
        np.testing.assert_array_equal(a, b)


def test_two_layers_and_routing_from_many_threads(layers):
    xs = _inputs(THREADS * CALLS, seed=2)
    big = np.random.default_rng(3).standard_normal((4096, 64)).astype(np.float32)
    jobs = []
    for i, x in enumerate(xs):
        if i % 3 == 2:
            # big enough for the parallel routing kernel
            jobs.append(lambda: nm.route(big, 4, gating="sigmoid"))
        else:
            jobs.append(lambda x=x, lay=layers[i % 2]: lay(x))
    serial = [job() for job in jobs]
    concurrent = _run_threads(jobs)
    for a, b in zip(serial, concurrent):
        if isinstance(a, nm.RouterOutput):
            np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
            np.testing.assert_array_equal(a.expert_weights, b.expert_weights)
        else:
            np.testing.assert_array_equal(a, b)


def test_guard_serializes_under_workqueue(monkeypatch):
    """Under workqueue a second thread waits at the guard; the lock is re-entrant."""
    monkeypatch.setattr(threading_guard, "_LAYER", "workqueue")
    inside = threading.Event()
    release = threading.Event()
    entered = threading.Event()

    def holder():
        with threading_guard.parallel_launch():
            with threading_guard.parallel_launch():      # re-entrant on one thread
                inside.set()
                release.wait(10)

    def other():
        with threading_guard.parallel_launch():
            entered.set()

    a = threading.Thread(target=holder)
    a.start()
    assert inside.wait(10)
    b = threading.Thread(target=other)
    b.start()
    assert not entered.wait(0.2), "a second thread entered while the guard was held"
    release.set()
    a.join(10)
    b.join(10)
    assert entered.is_set()


def test_guard_is_a_no_op_on_thread_safe_layers(monkeypatch):
    monkeypatch.setattr(threading_guard, "_LAYER", "omp")
    assert not threading_guard.serializes_launches()
    done = []

    def other():
        with threading_guard.parallel_launch():
            done.append(1)

    with threading_guard.parallel_launch():
        t = threading.Thread(target=other)
        t.start()
        t.join(10)
    assert done == [1]


_WORKQUEUE_SCRIPT = """
import sys, threading
import numpy as np
import numba_moe as nm
from numba_moe import threading_guard

paths = sys.argv[1:]
assert threading_guard.threading_layer() == "workqueue", threading_guard.threading_layer()
assert threading_guard.serializes_launches()
big = np.random.default_rng(0).standard_normal((4096, 64)).astype(np.float32)
layers = [nm.load_moe_layer(p) for p in paths]
x = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
MODE = "{mode}"

def job(i):
    if MODE == "route":
        return nm.route(big, 4).expert_ids
    if MODE == "dequant":
        t = layers[0].expert_tensors[i % 3]
        return nm.quants.dequantize(t.data, t.qtype)
    return layers[i % len(layers)](x)

serial = [job(i) for i in range(8)]
barrier = threading.Barrier(4)
bad = []

def worker(w):
    barrier.wait()
    for i in range(w, 8, 4):
        for _ in range(3):
            if not np.array_equal(job(i), serial[i]):
                bad.append(i)

ts = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
print("mismatches", len(bad))
"""


def _workqueue(mode, paths):
    env = dict(__import__("os").environ, NUMBA_THREADING_LAYER="workqueue")
    return subprocess.run([sys.executable, "-c", _WORKQUEUE_SCRIPT.replace("{mode}", mode),
                           *paths], env=env, capture_output=True, text=True, timeout=600)


def test_routing_under_workqueue_does_not_abort(layers):
    r = _workqueue("route", [])
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-600:]}"
    assert "mismatches 0" in r.stdout


def test_forward_under_workqueue_does_not_abort(layers):
    r = _workqueue("forward", [lay.path for lay in layers])
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-600:]}"
    assert "mismatches 0" in r.stdout


def test_dequantize_under_workqueue_does_not_abort(layers):
    r = _workqueue("dequant", [layers[0].path])
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-600:]}"
    assert "mismatches 0" in r.stdout

"""Time routing and dispatch planning at the reference token counts.

Prints, per T: ``route`` (softmax, Qwen3-30B-A3B: E=128, K=8) and its
allocation-free ``route_into``, the DeepSeek-V3 router (E=256, sigmoid,
bias, 8 groups), a numpy argsort baseline for the plain softmax router,
``BucketPlan.rebuild``, ``moe_align_block_size`` and ``pick_block_size``.
All in microseconds, best of several repeats.

    python benchmarks/bench_routing.py
"""
import time

import numba
import numpy as np

import numba_moe as nm
from numba_moe.routing import route_scratch_shape

TOKENS = (1, 4, 16, 64, 512)


def best_us(fn, repeat=7, number=None):
    fn()
    if number is None:
        t0 = time.perf_counter()
        fn()
        number = max(1, int(2e-3 / max(time.perf_counter() - t0, 1e-7)))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best * 1e6


def numpy_route(logits, k):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, 1)
    return ids, w / w.sum(1, keepdims=True)


def main():
    rng = np.random.default_rng(0)
    n, k = 128, 8
    print(f"numba {numba.__version__}, {numba.get_num_threads()} threads; times in us")
    cols = ["T", "route", "route_into", "dsv3 route", "numpy ref", "plan.rebuild",
            "align(16)", "pick"]
    print("".join(f"{c:>13}" for c in cols))
    max_t = max(TOKENS)
    ids_buf = np.empty((max_t, k), np.int32)
    w_buf = np.empty((max_t, k), np.float32)
    scratch = np.empty(route_scratch_shape(max_t, n), np.float32)
    plan = nm.BucketPlan.empty(max_t, k, n)
    bias = (rng.standard_normal(256) * 0.1).astype(np.float32)
    for t in TOKENS:
        logits = rng.standard_normal((t, n)).astype(np.float32)
        ds_logits = rng.standard_normal((t, 256)).astype(np.float32)
        r = nm.route(logits, k)
        plan.rebuild(*r)
        row = [
            best_us(lambda: nm.route(logits, k)),
            best_us(lambda: nm.route_into(logits, ids_buf[:t], w_buf[:t], scratch, k)),
            best_us(lambda: nm.route(ds_logits, 8, gating="sigmoid", selection_bias=bias,
                                     n_group=8, topk_group=4, scale=2.5)),
            best_us(lambda: numpy_route(logits, k)),
            best_us(lambda: plan.rebuild(r.expert_ids, r.expert_weights)),
            best_us(lambda: nm.moe_align_block_size(r.expert_ids, n, 16)),
            best_us(lambda: nm.pick_block_size(plan.expert_offsets, plan.num_pairs)),
        ]
        print(f"{t:>13}" + "".join(f"{v:>13.1f}" for v in row))


if __name__ == "__main__":
    main()

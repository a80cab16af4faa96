"""numba_moe.route / route_into against a slow float64 reference.

Ids must match exactly; weights to rtol 1e-6 (plus atol 1e-37 for float32
denormals, whose relative precision is coarse): the kernel rounds each
probability to float32 once and the final weight once more, 2-3 ulp in all.
"""
import numpy as np
import pytest

import numba_moe as nm
from numba_moe.errors import MoEError
from numba_moe.routing import route_scratch_shape

RTOL = 1e-6
ATOL = 1e-37


# --------------------------------------------------------------------------
# reference: plain Python, float64, sort-based selection
# --------------------------------------------------------------------------

def _f32(v):
    return float(np.float32(v))


def _clean(v):
    return float("-inf") if v != v else v


def ref_route(logits, top_k, norm=True, gating="softmax", bias=None, n_group=1,
              topk_group=1, scale=1.0):
    logits = np.asarray(logits, dtype=np.float32)
    n_tok, n = logits.shape
    ids = np.zeros((n_tok, top_k), dtype=np.int64)
    weights = np.zeros((n_tok, top_k), dtype=np.float64)
    with np.errstate(all="ignore"):
        for t in range(n_tok):
            x = [float(v) for v in logits[t]]
            if gating == "softmax":
                finite = [v for v in x if v == v]
                m = max(finite) if finite else float("-inf")
                ex = [float(np.exp(np.float64(v - m))) for v in x]
                s = sum(ex)
                probs = [_f32(v / s) for v in ex]
            elif gating == "sigmoid":
                probs = [_f32(1.0 / (1.0 + float(np.exp(np.float64(-v))))) for v in x]
            else:
                probs = list(x)
            if bias is None:
                sel = [_clean(p) for p in probs]
            else:
                sel = [_clean(_f32(np.float32(p) + np.float32(b))) for p, b in zip(probs, bias)]
            if n_group > 1:
                gsize = n // n_group
                gscores = []
                for g in range(n_group):
                    top = sorted(sel[g * gsize:(g + 1) * gsize], reverse=True)
                    gs = top[0] if gsize == 1 else _f32(np.float32(top[0]) + np.float32(top[1]))
                    gscores.append(_clean(gs))
                keep = sorted(range(n_group), key=lambda g: (-gscores[g], g))[:topk_group]
                sel = [v if e // gsize in keep else float("-inf") for e, v in enumerate(sel)]
            chosen = sorted(range(n), key=lambda e: (-sel[e], e))[:top_k]
            ids[t] = chosen
            if gating == "softmax_weight":
                vals = [x[e] for e in chosen]
                finite = [v for v in vals if v == v]
                m = max(finite) if finite else float("-inf")
                ex = [float(np.exp(np.float64(v - m))) for v in vals]
                s = sum(ex)
                weights[t] = [v / s * scale for v in ex]
                continue
            p = [probs[e] for e in chosen]
            if norm:
                s = sum(p)
                if s <= 0:
                    weights[t] = [scale / top_k] * top_k
                else:
                    weights[t] = [v / s * scale for v in p]
            else:
                weights[t] = [v * scale for v in p]
    return ids, weights


def check(logits, top_k, **kw):
    out = nm.route(logits, top_k, **kw)
    ref_kw = dict(norm=kw.get("norm_topk_prob", True), gating=kw.get("gating", "softmax"),
                  bias=kw.get("selection_bias"), n_group=kw.get("n_group", 1),
                  topk_group=kw.get("topk_group", 1), scale=kw.get("scale", 1.0))
    ids, weights = ref_route(logits, top_k, **ref_kw)
    assert out.expert_ids.dtype == np.int32 and out.expert_weights.dtype == np.float32
    assert out.expert_ids.shape == out.expert_weights.shape == (logits.shape[0], top_k)
    np.testing.assert_array_equal(out.expert_ids, ids)
    np.testing.assert_allclose(out.expert_weights, weights, rtol=RTOL, atol=ATOL, equal_nan=True)
    return out


def assert_valid_ids(ids, num_experts):
    assert ids.min() >= 0 and ids.max() < num_experts
    for row in ids:
        assert len(set(row.tolist())) == len(row)


# --------------------------------------------------------------------------
# semantics
# --------------------------------------------------------------------------

def test_random_routings_match_reference():
    rng = np.random.default_rng(1)
    shapes = [(1, 1, 1), (3, 2, 1), (5, 2, 2), (4, 7, 3), (17, 8, 2), (9, 64, 8),
              (6, 128, 8), (3, 256, 32), (2, 512, 32), (1, 512, 8), (4, 16, 16), (1, 33, 33)]
    for n_tok, n, k in shapes:
        for gating in ("softmax", "sigmoid", "softmax_weight"):
            for norm in (True, False):
                logits = (rng.standard_normal((n_tok, n)) * rng.uniform(0.5, 4)).astype(np.float32)
                bias = None
                if rng.random() < 0.5:
                    bias = (rng.standard_normal(n) * 0.3).astype(np.float32)
                scale = float(rng.choice([1.0, 2.5, 0.5]))
                out = check(logits, k, norm_topk_prob=norm, gating=gating, selection_bias=bias,
                            scale=scale)
                assert_valid_ids(out.expert_ids, n)


def test_descending_selection_and_plain_softmax_properties():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((20, 64)).astype(np.float32)
    out = nm.route(logits, 6, norm_topk_prob=False)
    chosen = np.take_along_axis(logits, out.expert_ids.astype(np.int64), axis=1)
    assert np.all(np.diff(chosen, axis=1) <= 0)
    ref = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(out.expert_weights, np.take_along_axis(ref, out.expert_ids, 1),
                               rtol=RTOL)
    normed = nm.route(logits, 6)
    np.testing.assert_allclose(normed.expert_weights.sum(1), 1.0, rtol=RTOL)


def test_ties_go_to_lower_index():
    rng = np.random.default_rng(3)
    for n, k in [(8, 2), (16, 4), (64, 8), (128, 32)]:
        for gating in ("softmax", "sigmoid", "softmax_weight"):
            logits = rng.integers(-2, 3, size=(12, n)).astype(np.float32)
            check(logits, k, gating=gating)
    flat = np.zeros((2, 10), dtype=np.float32)
    out = nm.route(flat, 4)
    np.testing.assert_array_equal(out.expert_ids, [[0, 1, 2, 3]] * 2)
    np.testing.assert_allclose(out.expert_weights, 0.25, rtol=RTOL)
    logits = np.array([[1, 3, 3, 0, 3]], dtype=np.float32)
    np.testing.assert_array_equal(nm.route(logits, 4).expert_ids, [[1, 2, 4, 0]])


def test_bias_selects_but_does_not_weigh():
    logits = np.array([[2.0, 1.0, 0.0, -1.0]], dtype=np.float32)
    bias = np.array([0.0, 0.0, 5.0, 5.0], dtype=np.float32)
    out = nm.route(logits, 2, norm_topk_prob=False, gating="sigmoid", selection_bias=bias)
    np.testing.assert_array_equal(out.expert_ids, [[2, 3]])
    np.testing.assert_allclose(out.expert_weights, [[0.5, 1 / (1 + np.e)]], rtol=RTOL)
    check(logits, 2, gating="sigmoid", selection_bias=bias)


def test_deepseek_v3_groups():
    rng = np.random.default_rng(4)
    n, n_group, topk_group, k = 256, 8, 4, 8
    logits = rng.standard_normal((24, n)).astype(np.float32)
    bias = (rng.standard_normal(n) * 0.5).astype(np.float32)
    out = check(logits, k, gating="sigmoid", selection_bias=bias, n_group=n_group,
                topk_group=topk_group, scale=2.5)
    groups = out.expert_ids // (n // n_group)
    assert all(len(set(row.tolist())) <= topk_group for row in groups)
    np.testing.assert_allclose(out.expert_weights.sum(1), 2.5, rtol=RTOL)
    # group limiting changes the answer compared with no groups at all
    free = nm.route(logits, k, gating="sigmoid", selection_bias=bias, scale=2.5)
    assert not np.array_equal(free.expert_ids, out.expert_ids)


def test_groups_random_and_edge_sizes():
    rng = np.random.default_rng(5)
    cases = [(16, 4, 2, 4), (16, 16, 5, 3), (12, 3, 1, 4), (64, 8, 3, 6), (8, 2, 2, 8),
             (32, 32, 32, 32)]
    for n, n_group, topk_group, k in cases:
        for gating in ("softmax", "sigmoid", "softmax_weight"):
            logits = rng.standard_normal((7, n)).astype(np.float32)
            bias = (rng.standard_normal(n) * 0.2).astype(np.float32)
            check(logits, k, gating=gating, selection_bias=bias, n_group=n_group,
                  topk_group=topk_group)
            ties = rng.integers(0, 2, size=(7, n)).astype(np.float32)
            check(ties, k, gating=gating, n_group=n_group, topk_group=topk_group)


def test_softmax_weight():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((10, 32)).astype(np.float32)
    for norm in (True, False):
        out = check(logits, 4, gating="softmax_weight", norm_topk_prob=norm, scale=2.0)
        np.testing.assert_allclose(out.expert_weights.sum(1), 2.0, rtol=RTOL)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(out.expert_ids, top)
    # huge logits: the max is subtracted, nothing overflows
    big = np.array([[1000.0, 999.0, -1000.0]], dtype=np.float32)
    w = nm.route(big, 2, gating="softmax_weight").expert_weights
    np.testing.assert_allclose(w, [[1 / (1 + np.exp(-1.0)), 1 / (1 + np.e)]], rtol=RTOL)


def test_renormalisation_of_zero_sum_gives_uniform():
    # float32 sigmoid(-200) underflows to exactly 0: the chosen sum is 0
    logits = np.full((3, 16), -200.0, dtype=np.float32)
    out = check(logits, 4, gating="sigmoid", scale=2.5)
    np.testing.assert_array_equal(out.expert_weights, np.float32(2.5 / 4))
    np.testing.assert_array_equal(out.expert_ids, [[0, 1, 2, 3]] * 3)
    # softmax: the bias picks experts whose probability underflows to 0
    logits = np.array([[0.0, -200.0, -300.0, -250.0]], dtype=np.float32)
    bias = np.array([0.0, 2.0, 2.0, 2.0], dtype=np.float32)
    out = check(logits, 3, selection_bias=bias)
    np.testing.assert_array_equal(out.expert_ids, [[1, 2, 3]])
    np.testing.assert_array_equal(out.expert_weights, np.float32(1 / 3))
    # without renormalisation the zeros stay
    out = nm.route(logits, 3, norm_topk_prob=False, selection_bias=bias)
    np.testing.assert_array_equal(out.expert_weights, 0.0)


def test_nan_and_inf_rows():
    rng = np.random.default_rng(7)
    n, k = 32, 6
    logits = rng.standard_normal((6, n)).astype(np.float32)
    logits[0] = np.nan                      # all NaN
    logits[1, 3] = np.nan                   # one NaN
    logits[2, ::2] = np.nan                 # half NaN
    logits[3, 5] = np.inf
    logits[4] = -np.inf
    logits[5, 0] = -np.inf
    for gating in ("softmax", "sigmoid", "softmax_weight"):
        for n_group, topk_group in ((1, 1), (4, 2)):
            out = check(logits, k, gating=gating, n_group=n_group, topk_group=topk_group)
            assert_valid_ids(out.expert_ids, n)
    out = nm.route(logits, k)
    np.testing.assert_array_equal(out.expert_ids[0], np.arange(k))
    assert np.isnan(out.expert_weights[:5]).all()     # softmax spreads NaN over the row
    assert np.isfinite(out.expert_weights[5]).all()
    sig = nm.route(logits, k, gating="sigmoid")
    assert 3 not in sig.expert_ids[1] and np.isfinite(sig.expert_weights[1]).all()
    assert np.all(sig.expert_ids[2] % 2 == 1)
    assert sig.expert_ids[3, 0] == 5
    np.testing.assert_array_equal(sig.expert_ids[0], np.arange(k))
    assert np.isnan(sig.expert_weights[0]).all()
    bias = np.zeros(n, dtype=np.float32)
    bias[:4] = np.nan
    out = check(logits[1:2], k, gating="sigmoid", selection_bias=bias)
    assert not set(out.expert_ids[0].tolist()) & {0, 1, 2, 3}


def test_k_equals_e_and_single_expert():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((5, 9)).astype(np.float32)
    out = check(logits, 9)
    assert sorted(out.expert_ids[0].tolist()) == list(range(9))
    np.testing.assert_allclose(out.expert_weights.sum(1), 1.0, rtol=RTOL)
    one = nm.route(np.array([[3.0], [-1.0]], dtype=np.float32), 1)
    np.testing.assert_array_equal(one.expert_ids, [[0], [0]])
    np.testing.assert_array_equal(one.expert_weights, [[1.0], [1.0]])


def test_input_conversion_and_empty():
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((4, 12))
    a = nm.route(logits, 3)
    b = nm.route(logits.astype(np.float32), 3)
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    np.testing.assert_array_equal(a.expert_weights, b.expert_weights)
    wide = rng.standard_normal((4, 24)).astype(np.float32)
    c = nm.route(wide[:, ::2], 3)
    d = nm.route(np.ascontiguousarray(wide[:, ::2]), 3)
    np.testing.assert_array_equal(c.expert_ids, d.expert_ids)
    empty = nm.route(np.zeros((0, 12), dtype=np.float32), 3)
    assert empty.expert_ids.shape == (0, 3) and empty.expert_weights.shape == (0, 3)
    assert isinstance(empty, nm.RouterOutput)


@pytest.mark.parametrize("kw, match", [
    (dict(top_k=0), "top_k"),
    (dict(top_k=9), "top_k"),
    (dict(top_k=2.0), "top_k"),
    (dict(top_k=2, gating="relu"), "gating"),
    (dict(top_k=2, selection_bias=np.zeros(7, np.float32)), "selection_bias"),
    (dict(top_k=2, selection_bias=np.zeros(8, np.int32)), "selection_bias"),
    (dict(top_k=2, n_group=3), "n_group"),
    (dict(top_k=2, n_group=0), "n_group"),
    (dict(top_k=2, n_group=4, topk_group=0), "topk_group"),
    (dict(top_k=2, n_group=4, topk_group=5), "topk_group"),
    (dict(top_k=5, n_group=4, topk_group=2), "topk_group"),
    (dict(top_k=2, norm_topk_prob="yes"), "norm_topk_prob"),
    (dict(top_k=2, scale="2"), "scale"),
])
def test_bad_options(kw, match):
    logits = np.ones((2, 8), dtype=np.float32)
    with pytest.raises(MoEError, match=match):
        nm.route(logits, **kw)


@pytest.mark.parametrize("logits", [
    np.ones((2, 8), dtype=np.int32),
    np.ones((2, 8), dtype=np.float16),
    np.ones(8, dtype=np.float32),
    np.ones((2, 2, 8), dtype=np.float32),
    np.ones((2, 0), dtype=np.float32),
])
def test_bad_logits(logits):
    with pytest.raises(MoEError, match="logits"):
        nm.route(logits, 1)


# --------------------------------------------------------------------------
# route_into
# --------------------------------------------------------------------------

def test_route_into_reuses_buffers():
    rng = np.random.default_rng(10)
    n, k, n_group = 64, 6, 8
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
    max_tok = 16
    ids_buf = np.empty((max_tok, k), dtype=np.int32)
    w_buf = np.empty((max_tok, k), dtype=np.float32)
    scratch = np.empty(route_scratch_shape(max_tok, n, n_group), dtype=np.float32)
    assert scratch.shape == (16, 2 * n + n_group)
    for n_tok in (1, 5, 16):
        logits = rng.standard_normal((n_tok, n)).astype(np.float32)
        ids, w = ids_buf[:n_tok], w_buf[:n_tok]
        ids.fill(-7)
        w.fill(np.nan)
        scratch.fill(np.nan)
        kw = dict(gating="sigmoid", selection_bias=bias, n_group=n_group, topk_group=3,
                  scale=2.5)
        got = nm.route_into(logits, ids, w, scratch, k, **kw)
        assert got.expert_ids is ids and got.expert_weights is w
        ref = nm.route(logits, k, **kw)
        np.testing.assert_array_equal(ids, ref.expert_ids)
        np.testing.assert_array_equal(w, ref.expert_weights)
    wide = np.empty((20, 2 * n + n_group + 5), dtype=np.float32)
    logits = rng.standard_normal((3, n)).astype(np.float32)
    nm.route_into(logits, ids_buf[:3], w_buf[:3], wide, k)
    np.testing.assert_array_equal(ids_buf[:3], nm.route(logits, k).expert_ids)


def test_route_into_rejects_bad_buffers():
    logits = np.ones((4, 8), dtype=np.float32)
    ids = np.empty((4, 2), dtype=np.int32)
    w = np.empty((4, 2), dtype=np.float32)
    scratch = np.empty((4, 16 + 1), dtype=np.float32)
    nm.route_into(logits, ids, w, scratch, 2)
    with pytest.raises(MoEError, match="out_ids"):
        nm.route_into(logits, ids.astype(np.int64), w, scratch, 2)
    with pytest.raises(MoEError, match="out_ids"):
        nm.route_into(logits, ids[:3], w, scratch, 2)
    with pytest.raises(MoEError, match="out_weights"):
        nm.route_into(logits, ids, np.empty((4, 4), np.float32)[:, ::2], scratch, 2)
    with pytest.raises(MoEError, match="scratch"):
        nm.route_into(logits, ids, w, scratch[:3], 2)
    with pytest.raises(MoEError, match="scratch"):
        nm.route_into(logits, ids, w, scratch[:, :16], 2)
    with pytest.raises(MoEError, match="scratch"):
        nm.route_into(logits, ids, w, scratch, 2, n_group=2)
    with pytest.raises(MoEError, match="logits"):
        nm.route_into(logits.astype(np.float64), ids, w, scratch, 2)
    with pytest.raises(MoEError, match="logits"):
        nm.route_into(np.ones((4, 16), np.float32)[:, ::2], ids, w, scratch, 2)


def test_parallel_and_serial_drivers_agree():
    from numba_moe import routing
    rng = np.random.default_rng(11)
    n_tok, n, k = 160, 128, 8
    assert n_tok * n >= routing._PARALLEL_MIN_LOGITS      # route() takes the parallel driver
    logits = rng.integers(-4, 5, size=(n_tok, n)).astype(np.float32)
    logits[::7] += rng.standard_normal((len(logits[::7]), n)).astype(np.float32)
    logits[3, 10] = np.nan
    out = check(logits, k, gating="sigmoid", n_group=4, topk_group=2, scale=1.5)
    ids = np.full((n_tok, k), -1, dtype=np.int32)
    w = np.full((n_tok, k), np.nan, dtype=np.float32)
    scratch = np.full(route_scratch_shape(n_tok, n, 4), np.nan, dtype=np.float32)
    routing._route_serial(logits, routing._NO_BIAS, routing.GATINGS["sigmoid"], k, True, 4, 2,
                          1.5, ids, w, scratch)
    np.testing.assert_array_equal(ids, out.expert_ids)
    np.testing.assert_array_equal(w, out.expert_weights)

"""CPU kernels one at a time: activation quantization, grouped GEMMs, combine, schedule.

Grouped GEMMs are checked against ``gguf.quants.dequantize`` + float64 matmul
of the same blocks.  Native types quantize the activations (12-bit codes):
relative error bound 5e-3 of the output's magnitude; dense types 1e-5.
"""
import gguf
import numpy as np
import pytest
from numba import njit

import numba_moe as nm
from numba_moe.config import override
from numba_moe.cpu import combine, gemm, grouped_down, grouped_gate_up, quantize_rows, simd
from numba_moe.cpu.schedule import max_items, schedule_items
from numba_moe.errors import MoEError
from numba_moe.experts import ExpertTensor

Q = gguf.GGMLQuantizationType
pytestmark = pytest.mark.filterwarnings("ignore:.*no native kernel")
NATIVE_TOL = 5e-3
DENSE_TOL = 1e-5


def rel_err(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def make_tensor(qtype, num_experts, rows, cols, seed):
    """ExpertTensor of gaussian weights stored as ``qtype``."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((num_experts, rows, cols)) / np.sqrt(cols)).astype(np.float32)
    if qtype == Q.F32:
        data = w
    elif qtype == Q.F16:
        data = w.astype(np.float16).view(np.uint8)
    else:
        data = nm.quants.quantize(w, qtype)
    return ExpertTensor(f"test.{qtype.name}", qtype, num_experts, rows, cols, data)


def dense64(t):
    if t.qtype == Q.F32:
        return t.data.astype(np.float64)
    return gguf.quants.dequantize(t.data, t.qtype).reshape(t.shape).astype(np.float64)


def make_plan(num_tokens, num_experts, top_k, seed):
    """A routing with uneven expert loads (some experts empty)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(num_experts, 0.5))
    ids = np.stack([rng.choice(num_experts, top_k, replace=False, p=p)
                    for _ in range(num_tokens)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, ids.shape).astype(np.float32)
    return nm.BucketPlan.build(ids, w, num_experts)


def silu(v):
    return v / (1.0 + np.exp(-v))


# -- activation quantization -------------------------------------------------

def test_quantize_rows_reconstructs_within_half_a_step():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 288)) * rng.uniform(0.01, 100, (5, 1))).astype(np.float32)
    q, d, mb = quantize_rows(x)
    assert q.dtype == np.int16 and d.shape == (5, 2) and mb.shape == (5, 9)
    scale = np.repeat(d, 256, axis=1)[:, :288]
    err = np.abs(q * scale.astype(np.float64) - x)
    assert np.all(err <= np.abs(scale) * 0.5001 + 1e-30)
    assert np.abs(q).max() == 2047
    sums = q.reshape(5, 9, 32).sum(axis=2) * np.repeat(d, 8, axis=1)[:, :9]
    np.testing.assert_allclose(mb, sums, rtol=1e-6)


def test_quantize_rows_signed_max_rule():
    """ggml's Q8_K rule: the element of largest magnitude maps to -QMAX (d = -max/2047)."""
    x = np.zeros((1, 256), dtype=np.float32)
    x[0, 3] = 4.0
    x[0, 7] = -1.0
    q, d, _ = quantize_rows(x)
    assert q[0, 3] == -2047 and d[0, 0] == np.float32(1.0) / np.float32(-2047.0 / 4.0)


def test_quantize_rows_zero_and_nonfinite_blocks():
    x = np.ones((3, 512), dtype=np.float32)
    x[0, :256] = 0.0
    x[1, 300] = np.nan
    x[2, 10] = np.inf
    q, d, mb = quantize_rows(x)
    assert d[0, 0] == 0 and not q[0, :256].any() and not mb[0, :8].any()
    assert np.isnan(d[1, 1]) and np.isfinite(d[1, 0]) and np.isnan(mb[1, 8:]).all()
    assert np.isnan(d[2, 0])


def test_quantize_rows_rejects_bad_input():
    with pytest.raises(MoEError, match="x"):
        quantize_rows(np.ones((2, 256), dtype=np.float64))
    with pytest.raises(MoEError, match="multiple of 32"):
        quantize_rows(np.ones((2, 40), dtype=np.float32))


# -- grouped GEMMs -------------------------------------------------------------

GEMM_TYPES = [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.F32, Q.F16]


@pytest.mark.parametrize("qtype", GEMM_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("num_tokens", [1, 9, 70])
def test_grouped_gate_up_matches_float64(qtype, num_tokens):
    E, I, H, K = 5, 40, 512, 2
    gate = make_tensor(qtype, E, I, H, 1)
    up = make_tensor(qtype, E, I, H, 2)
    plan = make_plan(num_tokens, E, K, 3)
    x = np.random.default_rng(4).standard_normal((num_tokens, H)).astype(np.float32)
    out = np.full((num_tokens * K + 3, I), np.nan, dtype=np.float32)
    h = grouped_gate_up(gate, up, x, plan.expert_offsets, plan.packed_token_idx, out=out)
    assert h.shape == (num_tokens * K, I) and not np.isnan(h).any()
    g64, u64 = dense64(gate), dense64(up)
    ref = np.empty(h.shape)
    for e in range(E):
        s0, s1 = plan.expert_offsets[e], plan.expert_offsets[e + 1]
        xs = x[plan.packed_token_idx[s0:s1]].astype(np.float64)
        ref[s0:s1] = silu(xs @ g64[e].T) * (xs @ u64[e].T)
    tol = DENSE_TOL if qtype in (Q.F32, Q.F16) else NATIVE_TOL
    assert rel_err(h, ref) <= tol
    assert np.isnan(out[num_tokens * K:]).all()


@pytest.mark.parametrize("qtype", GEMM_TYPES, ids=lambda q: q.name)
def test_grouped_down_matches_float64(qtype):
    E, H, I, P = 4, 72, 256, 37
    down = make_tensor(qtype, E, H, I, 5)
    counts = np.array([10, 0, 20, 7])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    h = np.random.default_rng(6).standard_normal((P, I)).astype(np.float32)
    out = np.full((P, H), np.nan, dtype=np.float32)
    y = grouped_down(down, h, offsets, out=out)
    d64 = dense64(down)
    ref = np.concatenate([h[offsets[e]:offsets[e + 1]].astype(np.float64) @ d64[e].T
                          for e in range(E)])
    tol = DENSE_TOL if qtype in (Q.F32, Q.F16) else NATIVE_TOL
    assert rel_err(y, ref) <= tol


SIMD_MODES = [False, pytest.param(True, marks=pytest.mark.skipif(
    not simd.AVAILABLE, reason="host without AVX-512"))]


@pytest.mark.parametrize("use_simd", SIMD_MODES, ids=["portable", "avx512"])
@pytest.mark.parametrize("down_type", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_one_token_from_blocks_matches_batched_path(use_simd, down_type):
    """One token: rows are dotted straight from the blocks (Q4_K; Q6_K too
    with AVX-512); same products as decode + dot."""
    E, I, H, K = 4, 256, 512, 2
    gate = make_tensor(Q.Q4_K, E, I, H, 13)
    up = make_tensor(Q.Q4_K, E, I, H, 14)
    down = make_tensor(down_type, E, H, I, 15)
    x = np.random.default_rng(16).standard_normal((2, H)).astype(np.float32)
    x[1] = x[0]
    one = make_plan(1, E, K, 17)
    two_off = np.asarray(one.expert_offsets) * 2
    two_tok = np.repeat(np.asarray(one.packed_token_idx[:K]), 2) + np.tile([0, 1], K).astype(np.int32)
    with override(simd=use_simd):
        h1 = grouped_gate_up(gate, up, x[:1], one.expert_offsets, one.packed_token_idx)
        h2 = grouped_gate_up(gate, up, x, two_off, two_tok.astype(np.int32))
        assert rel_err(h1, h2[::2]) <= 1e-5
        e = int(np.flatnonzero(np.diff(one.expert_offsets))[0])
        off1 = np.zeros(E + 1, np.int64)
        off1[e + 1:] = 1
        y1 = grouped_down(down, h1[:1], off1)
        y2 = grouped_down(down, np.repeat(h1[:1], 2, axis=0), off1 * 2)
    assert rel_err(y1, y2[:1]) <= 1e-5
    assert rel_err(y1, h1[:1].astype(np.float64) @ dense64(down)[e].T) <= NATIVE_TOL


@pytest.mark.skipif(not simd.AVAILABLE, reason="host without AVX-512")
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_avx512_kernels_match_portable_ones(qtype):
    """Uneven expert loads (1..3 tokens: direct; more: decode + 2x2 tiles with
    odd tails); 38 and 37 down rows (row groups of 4 ending in 2 and in 1)."""
    E, I, H, K, T = 6, 40, 512, 2, 23
    gate = make_tensor(qtype, E, I, H, 20)
    up = make_tensor(qtype, E, I, H, 21)
    down = make_tensor(qtype, E, 38, 256, 22)
    plan = make_plan(T, E, K, 23)
    x = np.random.default_rng(24).standard_normal((T, H)).astype(np.float32)
    hs = np.random.default_rng(25).standard_normal((T * K, 256)).astype(np.float32)
    out = {}
    for use_simd in (False, True):
        with override(simd=use_simd):
            out[use_simd] = (
                grouped_gate_up(gate, up, x, plan.expert_offsets, plan.packed_token_idx),
                grouped_down(down, hs, plan.expert_offsets),
                grouped_down(make_tensor(qtype, E, 37, 256, 22), hs, plan.expert_offsets))
    for a, b in zip(out[True], out[False]):
        assert rel_err(a, b) <= 1e-5
    d64 = dense64(down)
    ref = np.concatenate([hs[plan.expert_offsets[e]:plan.expert_offsets[e + 1]].astype(np.float64)
                          @ d64[e].T for e in range(E)])
    assert rel_err(out[True][1], ref) <= NATIVE_TOL


@pytest.mark.parametrize("qt", [gemm.QT_Q4_K, gemm.QT_Q6_K], ids=["Q4_K", "Q6_K"])
def test_portable_specialization_never_types_the_avx512_intrinsics(qt):
    """``simd=None`` prunes the AVX-512 branch at compile time (a CPU without
    AVX-512 could not compile it); ``simd=True`` compiles it."""
    tensor = make_tensor(Q.Q4_K if qt == gemm.QT_Q4_K else Q.Q6_K, 1, 2, 256, 18)
    p = gemm.projection(tensor)
    x = np.random.default_rng(19).standard_normal((1, 256)).astype(np.float32)
    aq, ad, amb = quantize_rows(x)

    ap = np.empty_like(aq)
    simd.q4_k_order_into(aq, 1, ap)

    @njit
    def one_dot(flag):
        return gemm._dot(qt, True, flag, p.q, p.q32, p.f, 0, 1, 256, aq, aq, ad, 0, aq, ad, amb,
                         ap, x, 0)

    one_dot(None)
    ir = one_dot.inspect_llvm(one_dot.signatures[0])
    assert "llvm.x86" not in ir
    if simd.AVAILABLE:
        one_dot(True)
        assert "llvm.x86.avx512.pmaddw.d.512" in one_dot.inspect_llvm(one_dot.signatures[1])
        if qt == gemm.QT_Q4_K:  # the portable path has no direct Q6_K form
            assert abs(one_dot(True) - one_dot(None)) <= 1e-5 * abs(one_dot(None))


def test_mixed_types_and_q8_0_partial_activation_block():
    """Gate Q8_0 / up F32 (each takes its own path); H = 288 leaves a 32-value tail block."""
    E, I, H = 3, 24, 288
    gate = make_tensor(Q.Q8_0, E, I, H, 7)
    up = make_tensor(Q.F32, E, I, H, 8)
    plan = make_plan(11, E, 2, 9)
    x = np.random.default_rng(10).standard_normal((11, H)).astype(np.float32)
    h = grouped_gate_up(gate, up, x, plan.expert_offsets, plan.packed_token_idx)
    g64, u64 = dense64(gate), dense64(up)
    xs = x[plan.packed_token_idx].astype(np.float64)
    e_of = np.repeat(np.arange(E), np.diff(plan.expert_offsets))
    ref = np.stack([silu(g64[e] @ xr) * (u64[e] @ xr) for e, xr in zip(e_of, xs)])
    assert rel_err(h, ref) <= NATIVE_TOL


@pytest.mark.parametrize("num_threads", [1, 3, 8])
def test_grouped_gemm_independent_of_thread_split(num_threads):
    gate = make_tensor(Q.Q4_K, 6, 40, 256, 11)
    up = make_tensor(Q.Q4_K, 6, 40, 256, 12)
    plan = make_plan(33, 6, 2, 13)
    x = np.random.default_rng(14).standard_normal((33, 256)).astype(np.float32)
    a = grouped_gate_up(gate, up, x, plan.expert_offsets, plan.packed_token_idx, num_threads=2)
    b = grouped_gate_up(gate, up, x, plan.expert_offsets, plan.packed_token_idx,
                        num_threads=num_threads)
    np.testing.assert_array_equal(a, b)


def test_grouped_gemm_input_validation():
    gate = make_tensor(Q.Q4_K, 2, 16, 256, 0)
    plan = make_plan(3, 2, 1, 0)
    x = np.ones((3, 256), dtype=np.float32)
    with pytest.raises(MoEError, match="x"):
        grouped_gate_up(gate, gate, x[:, :128], plan.expert_offsets, plan.packed_token_idx)
    with pytest.raises(MoEError, match="expert_offsets"):
        grouped_gate_up(gate, gate, x, plan.expert_offsets[:-1], plan.packed_token_idx)
    with pytest.raises(MoEError, match="packed_token_idx"):
        grouped_gate_up(gate, gate, x[:1], plan.expert_offsets, plan.packed_token_idx)
    with pytest.raises(MoEError, match="gate"):
        grouped_gate_up(gate.data, gate, x, plan.expert_offsets, plan.packed_token_idx)
    with pytest.raises(MoEError, match="h"):
        grouped_down(gate, np.ones((1, 256), np.float32), plan.expert_offsets)


# -- schedule and combine ------------------------------------------------------

def test_schedule_covers_every_tile_once_and_balances():
    counts = np.array([0, 5, 1, 0, 30, 2], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows, tile, nbins = 100, 16, 3
    items = np.zeros((max_items(6, rows, tile), 3), np.int64)
    bounds = np.zeros(nbins + 1, np.int64)
    n = schedule_items(offsets, rows, tile, 2, nbins, items, bounds)
    assert bounds[0] == 0 and bounds[-1] == n and np.all(np.diff(bounds) >= 0)
    covered = {(int(e), r) for e, r0, r1 in items[:n] for r in range(r0, r1)}
    assert covered == {(e, r) for e in (1, 2, 4, 5) for r in range(rows)}
    cost = [sum((r1 - r0) * (2 + counts[e]) for e, r0, r1 in items[bounds[k]:bounds[k + 1]])
            for k in range(nbins)]
    assert max(cost) - min(cost) <= 2 * tile * (2 + counts.max())


@pytest.mark.parametrize("shared", [None, "plain", "gated"])
def test_combine_assigns_weighted_sum(shared):
    rng = np.random.default_rng(20)
    T, K, H = 6, 3, 64
    plan = make_plan(T, 5, K, 21)
    y = rng.standard_normal((T * K, H)).astype(np.float32)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ys = rng.standard_normal((T, H)).astype(np.float32)
    gi = rng.standard_normal(H).astype(np.float32)
    out = np.full((T, H), np.nan, dtype=np.float32)
    kw = {}
    if shared:
        kw = dict(shared=ys, gate_inp=gi if shared == "gated" else None, x=x)
    combine(y, plan.pairs_by_token, plan.pair_weights, K, out, **kw)
    ref = (plan.pair_weights.reshape(T, K, 1).astype(np.float64)
           * y[plan.pairs_by_token.reshape(T, K)]).sum(axis=1)
    if shared == "plain":
        ref += ys
    elif shared == "gated":
        ref += ys / (1.0 + np.exp(-(x.astype(np.float64) @ gi)))[:, None]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_router_logits_match_float64_and_do_not_depend_on_the_batch():
    from numba_moe.cpu.logits import router_logits

    rng = np.random.default_rng(30)
    x = rng.standard_normal((37, 512)).astype(np.float32)
    w = rng.standard_normal((16, 512)).astype(np.float32)
    lg = router_logits(x, w)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    assert rel_err(lg, ref) <= 1e-5
    np.testing.assert_array_equal(router_logits(x[5:6].copy(), w), lg[5:6])
    with pytest.raises(MoEError, match="columns"):
        router_logits(x, w[:, :256].copy())

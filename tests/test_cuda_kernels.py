"""Each CUDA kernel against its CPU twin and a float64 reference.

Runs on a real GPU when there is one, else in numba's CUDA simulator with
small shapes (``cuda_backend`` picks); ``gpu_only`` tests use sizes only a
GPU runs in reasonable time.  Outputs are poisoned before every kernel.
"""
import cuda_backend  # noqa: F401  (must precede numba.cuda)
import gguf
import numpy as np
import pytest
from cuda_backend import SIMULATOR, gpu_only, need_cuda

import numba_moe as nm
from numba_moe.errors import MoEError
from numba_moe.experts import ExpertTensor

# grouped launches size their grids for the worst case; idle blocks exit
pytestmark = [need_cuda, pytest.mark.filterwarnings("ignore:.*Grid size")]
Q = gguf.GGMLQuantizationType

if cuda_backend.usable:
    from numba import cuda

    from numba_moe.config import CUDA_LAUNCH
    from numba_moe.cuda import combine, expert_gemm, plan_device, topk_route
    from numba_moe.cuda.actquant import launch_quantize, quantize_reference, quantized_sizes
    from numba_moe.cuda.actsplit import launch_split, split_reference, split_sizes
    from numba_moe.cuda.plan import empty_plan


def _poison(shape, dtype):
    fill = np.nan if np.dtype(dtype).kind == "f" else -7
    return cuda.to_device(np.full(shape, fill, dtype=dtype))


def _rel(got, ref):
    return np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref)


# ------------------------------------------------------------------ routing

ROUTINGS = [
    dict(gating="softmax", norm_topk_prob=True),
    dict(gating="softmax", norm_topk_prob=False, scale=2.5),
    dict(gating="sigmoid", norm_topk_prob=True, bias=True, n_group=4, topk_group=2, scale=1.5),
    dict(gating="softmax_weight"),
]


def _route_both(logits, k, opts, rng):
    opts = dict(opts)
    bias = rng.standard_normal(logits.shape[1]).astype(np.float32) * 0.1 \
        if opts.pop("bias", False) else None
    ref = nm.route(logits, k, selection_bias=bias, **opts)
    t = logits.shape[0]
    out = (_poison((t, k), np.int32), _poison((t, k), np.float32))
    got = topk_route(logits, k, selection_bias=bias, out=out, **opts)
    return ref, got.expert_ids.copy_to_host(), got.expert_weights.copy_to_host()


@pytest.mark.parametrize("opts", ROUTINGS, ids=lambda o: o["gating"] + str(len(o)))
def test_topk_matches_cpu(opts):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 16)).astype(np.float32)
    ref, ids, w = _route_both(logits, 4, opts, rng)
    np.testing.assert_array_equal(ids, ref.expert_ids)
    np.testing.assert_allclose(w, ref.expert_weights, rtol=1e-6, atol=0)


def test_topk_ties_nan_and_inf_rows():
    logits = np.array([[1, 3, 3, 0, 3, -1, 2, 2],           # ties go to the lower id
                       [np.nan] * 8,                        # all NaN: ids 0..K-1
                       [0, np.nan, 5, 1, -np.inf, 2, 2, 0],
                       # negative scores of either exponent range (softmax_weight
                       # selects on the logits); -0 ties 0
                       [-0.5, -3, -2.5, -0.25, -7, -1.5, -2, -0.75],
                       [-1, -0.0, 0, -2, -3, -4, -5, -6]], np.float32)
    for gating in ("softmax", "sigmoid", "softmax_weight"):
        ref, ids, w = _route_both(logits, 3, dict(gating=gating), np.random.default_rng(0))
        np.testing.assert_array_equal(ids, ref.expert_ids)
        np.testing.assert_allclose(w, ref.expert_weights, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("n_exp", [96, 160, 300])
@pytest.mark.parametrize("opts", ROUTINGS, ids=lambda o: o["gating"] + str(len(o)))
def test_topk_many_experts_matches_cpu(opts, n_exp):
    # several experts a lane (their selection keys in registers up to 256
    # experts, in shared memory for 300); ties within and across lanes go
    # to the lower id
    from numba_moe.cuda.routing import REG_KEYS_MAX, topk_kernel

    assert (topk_kernel(n_exp) is topk_kernel(3000)) == (n_exp > 32 * REG_KEYS_MAX)
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((2, n_exp)).astype(np.float32)
    logits[1, [3, 9, 40, 41, 72]] = 4.0
    ref, ids, w = _route_both(logits, 6, opts, rng)
    np.testing.assert_array_equal(ids, ref.expert_ids)
    np.testing.assert_allclose(w, ref.expert_weights, rtol=1e-6, atol=0)


@gpu_only
@pytest.mark.cuda
@pytest.mark.parametrize("opts", ROUTINGS, ids=lambda o: o["gating"] + str(len(o)))
def test_topk_large_matches_cpu(opts):
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((300, 512)).astype(np.float32)
    ref, ids, w = _route_both(logits, 32, opts, rng)
    np.testing.assert_array_equal(ids, ref.expert_ids)
    np.testing.assert_allclose(w, ref.expert_weights, rtol=1e-6, atol=0)


@pytest.mark.parametrize("parts", [2, 5, 11])
def test_topk_adds_partial_planes(parts):
    # the tiled router's partial planes: the routing kernel adds them into
    # the first plane, every one of the lstride columns, then routes the
    # sums.  Multiples of 1/16: the sums are exact, so ids and weights match
    # the CPU on the sum.
    from numba_moe.cuda.routing import launch_topk
    from numba_moe.routing import _check_params

    rng = np.random.default_rng(30 + parts)
    t, e, lstride, k = 5, 12, 14, 3
    planes = (rng.integers(-32, 33, (parts, t, lstride)) / 16).astype(np.float32)
    total = planes.sum(0)
    params = _check_params(e, k, True, "softmax", None, 1, 1, 1.0)
    d_logits = cuda.to_device(planes.reshape(-1))
    ids, w = _poison(t * k, np.int32), _poison(t * k, np.float32)
    launch_topk(d_logits, lstride, t, e, params, cuda.to_device(np.zeros(1, np.float32)),
                ids, w, 4, 0, parts)
    np.testing.assert_array_equal(d_logits.copy_to_host()[:t * lstride].reshape(t, lstride), total)
    ref = nm.route(total[:, :e], k)
    np.testing.assert_array_equal(ids.copy_to_host().reshape(t, k), ref.expert_ids)
    np.testing.assert_allclose(w.copy_to_host().reshape(t, k), ref.expert_weights, rtol=1e-6,
                               atol=0)


def test_topk_rejects_bad_input():
    with pytest.raises(MoEError, match="logits"):
        topk_route(np.zeros((2, 8), np.float64), 2)
    with pytest.raises(MoEError, match="top_k"):
        topk_route(np.zeros((2, 64), np.float32), 33)
    # one token's scratch (4 words an expert) past 48 KiB of shared memory
    with pytest.raises(MoEError, match="3100 experts"):
        topk_route(np.ones((1, 3100), np.float32), 2)


def test_topk_blocks_fit_shared_memory():
    # many experts: fewer tokens a block, so the scratch stays within 48 KiB
    from numba_moe.cuda.routing import block_warps, warp_words

    assert block_warps(128, 1, 4) == 4
    assert block_warps(1000, 1, 4) == 3
    assert block_warps(2047, 8, 4) == 1
    for e in (128, 1000, 2047):
        assert block_warps(e, 1, 4) * 4 * warp_words(e, 1) <= 48 << 10


# --------------------------------------------------------------------- plan

def _poisoned_plan(p, n_exp, bs):
    out = empty_plan(p, n_exp, bs)
    for a in out:
        a.copy_to_device(np.full(a.shape, -7, np.int32))
    return out


def _check_plan(ids, n_exp, bs):
    t, k = ids.shape
    got = plan_device(ids, n_exp, bs, out=_poisoned_plan(t * k, n_exp, bs))
    _compare_plan(got, ids, n_exp, bs)


def _compare_plan(got, ids, n_exp, bs):
    t, k = ids.shape
    p = t * k
    ref = nm.BucketPlan.build(ids, np.ones(ids.shape, np.float32), n_exp)
    np.testing.assert_array_equal(got.offsets.copy_to_host(), ref.expert_offsets)
    np.testing.assert_array_equal(got.packed_token_idx.copy_to_host()[:p], ref.packed_token_idx)
    np.testing.assert_array_equal(got.pairs_by_token.copy_to_host()[:p], ref.pairs_by_token)
    al = nm.moe_align_block_size(ids, n_exp, bs)
    meta = got.meta.copy_to_host()
    counts = np.bincount(ids.ravel(), minlength=n_exp)
    assert meta[0] == np.count_nonzero(counts)
    np.testing.assert_array_equal(got.active.copy_to_host()[:meta[0]], np.flatnonzero(counts))
    assert meta[1] == al.num_tokens_post_padded
    np.testing.assert_array_equal(got.sorted_ids.copy_to_host()[:meta[1]], al.sorted_token_ids)
    np.testing.assert_array_equal(got.block_expert.copy_to_host()[:meta[1] // bs],
                                  al.block_expert_ids)


@pytest.mark.parametrize("bs", [8] if SIMULATOR else [8, 16, 48])
def test_plan_matches_cpu(bs, monkeypatch):
    # 8 threads for 12 experts and 33 pairs: chunked scans and several
    # placement rounds; experts 3, 6, 9 and 10 get no pairs
    monkeypatch.setattr(CUDA_LAUNCH, "scan_threads", 8)
    rng = np.random.default_rng(bs)
    ids = rng.choice([0, 1, 2, 4, 5, 7, 8, 11], size=(11, 3)).astype(np.int32)
    _check_plan(ids, 12, bs)


@gpu_only
@pytest.mark.cuda
@pytest.mark.parametrize("t", [1, 64, 4096])
def test_plan_large_matches_cpu(t):
    rng = np.random.default_rng(t)
    ids = np.stack([rng.permutation(128)[:8] for _ in range(t)]).astype(np.int32)
    _check_plan(ids, 128, 64)


@pytest.mark.parametrize("codes", [False, True])
@pytest.mark.parametrize("t", [1, 11])
def test_router_logits_match_reference(t, codes):
    # 11 tokens: two passes of 8; lstride 7 > 5 rows leaves a column unwritten;
    # with codes, the same launch quantizes x as launch_quantize does
    from numba_moe.cuda.router import launch_router

    rng = np.random.default_rng(t)
    rows, cols, lstride = 5, 96, 7
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((t, cols)).astype(np.float32)
    logits = _poison(t * lstride, np.float32)
    nq, na = quantized_sizes(x.size)
    out = (cuda.to_device(np.full(nq, 0xDEADBEEF, np.uint32)), _poison(na, np.float32))
    launch_router(cuda.to_device(w.ravel()), cuda.to_device(x.ravel()), t, rows, cols, lstride,
                  logits, CUDA_LAUNCH.router_threads, 0, out if codes else None)
    got = logits.copy_to_host().reshape(t, lstride)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(got[:, :rows], ref, rtol=1e-5, atol=1e-5)
    assert np.isnan(got[:, rows:]).all()
    if codes:
        xq, xa = _quantize(x.ravel())
        np.testing.assert_array_equal(out[0].copy_to_host(), xq)
        np.testing.assert_array_equal(out[1].copy_to_host(), xa)


def test_plan_rejects_bad_ids():
    with pytest.raises(MoEError, match="expert_ids"):
        plan_device(np.array([[0, 9]], np.int32), 4, 16)
    with pytest.raises(MoEError, match="block_size"):
        plan_device(np.array([[0, 1]], np.int32), 4, 12)


def test_plan_rejects_what_its_packed_scan_cannot_hold():
    from numba_moe.cuda.plan import PLAN_MAX_EXPERTS, PLAN_MAX_SLOTS, check_plan_size

    with pytest.raises(MoEError, match="num_experts"):
        plan_device(np.array([[0, 1]], np.int32), PLAN_MAX_EXPERTS + 1, 16)
    check_plan_size(PLAN_MAX_SLOTS - 8 * 15, 8, 16)
    with pytest.raises(MoEError, match="split the batch"):
        check_plan_size(PLAN_MAX_SLOTS - 8 * 15 + 1, 8, 16)


# ------------------------------------------------------------ activation codes

def _quantize(x):
    nq, na = quantized_sizes(x.size)
    xq = cuda.to_device(np.full(nq, 0xDEADBEEF, np.uint32))
    xa = _poison(na, np.float32)
    launch_quantize(cuda.to_device(x), x.size, xq, xa, 0)
    cuda.synchronize()
    return xq.copy_to_host(), xa.copy_to_host()


def _codes_of(xq):
    """int32 codes 256 * hi + lo from the two byte planes of every group."""
    planes = xq.reshape(-1, 2, 4).view(np.int8).reshape(-1, 2, 16).astype(np.int32)
    return (256 * planes[:, 0] + planes[:, 1]).reshape(-1)


def test_activation_codes_match_reference():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(8 * 16) * rng.uniform(0.01, 100, 8).repeat(16)).astype(np.float32)
    x[32:64] = 0  # an all-zero pair of groups: zero codes, zero scale
    xq, xa = _quantize(x)
    q_ref, d_ref = quantize_reference(x)
    np.testing.assert_array_equal(_codes_of(xq), q_ref)
    xa = xa.reshape(-1, 3, 4)
    for part in range(3):
        np.testing.assert_array_equal(xa[:, part, 0], d_ref)
    g = x.reshape(-1, 16).astype(np.float64)
    rest = g - d_ref[:, None].astype(np.float64) * q_ref.reshape(-1, 16)
    for part, cols in enumerate((slice(0, 16), slice(0, 8), slice(8, 16))):
        np.testing.assert_allclose(xa[:, part, 1], g[:, cols].sum(1), rtol=1e-5, atol=1e-5)
        # each x - d q is exact to float32 rounding of x: 16 ulps of max|x| = 0.06 d
        assert (np.abs(xa[:, part, 2] - rest[:, cols].sum(1)) <= 0.1 * d_ref).all()
    xa = xa.reshape(-1, 12)
    # |x - d q| <= d / 2, up to the float32 rounding of x itself
    err = np.abs(xa[:, 0].astype(np.float64).repeat(16) * _codes_of(xq) - x).reshape(-1, 16)
    ulp = np.spacing(np.abs(x)).reshape(-1, 16).max(1)
    assert (err.max(1) <= 0.5 * d_ref + ulp).all()


def test_activation_codes_non_finite_group():
    # NaN in the first 32 columns, inf in the next 32 (scales are per 32)
    x = np.random.default_rng(12).standard_normal(96).astype(np.float32)
    x[3] = np.nan
    x[40] = np.inf
    xq, xa = _quantize(x)
    d = xa.reshape(-1, 12)[:, 0]
    assert np.isnan(d[:2]).all() and np.isinf(d[2:4]).all() and np.isfinite(d[4:]).all()
    assert (_codes_of(xq)[:64] == 0).all()
    np.testing.assert_array_equal(_codes_of(xq)[64:], quantize_reference(x[64:])[0])


def _split(x):
    rows, cols = x.shape
    nh, ns, nx = split_sizes(rows, cols)
    hx = cuda.to_device(np.full(nh, 0xFFFFFFFF, np.uint32))
    hs = cuda.to_device(np.full(ns, 0xFFFFFFFF, np.uint32))
    xs = cuda.to_device(np.full(nx, np.nan, np.float32))
    launch_split(cuda.to_device(x.reshape(-1)), rows, cols, hx, hs, xs, 0)
    return hx.copy_to_host().reshape(rows, cols), hs.copy_to_host(), xs.copy_to_host()


def _split_values(hx, xs):
    """float64 x from the split words: (hi + lo) * s, columns back in order."""
    rows, cols = hx.shape
    w = hx.view(np.float16).astype(np.float64).reshape(rows, cols // 16, 4, 2, 2, 2)
    v = w[:, :, :, 0] + w[:, :, :, 1]          # [row, group, i, p/q, half]
    quad = np.empty((rows, cols // 16, 4, 4))
    quad[..., [0, 2]] = v[:, :, :, 0]
    quad[..., [1, 3]] = v[:, :, :, 1]
    return quad.reshape(rows, cols) * xs[:, None]


def test_activation_split_matches_reference():
    rng = np.random.default_rng(13)
    scale = np.array([1e-30, 1e-3, 1.0, 300.0, 3e30])[:, None]
    # a block a row; 768 columns: 6 chunks of 128, so warps 0, 1 take two and
    # warps 2, 3 one (their second round redoes the last chunk, storing nothing)
    x = (rng.standard_normal((5, 768)) * scale).astype(np.float32)
    hx, hs, xs = _split(x)
    hx_ref, sums_ref, xs_ref = split_reference(x)
    np.testing.assert_array_equal(hx, hx_ref)
    np.testing.assert_array_equal(xs, xs_ref)
    # the pairs hold x to 2**-22 of each row's largest value
    err = np.abs(_split_values(hx, xs) - x).max(1) / np.abs(x).max(1)
    assert (err < 2.0 ** -22).all()
    # block sums: hi + lo pairs of S' (the kernel sums in another order)
    halves = hs.view(np.float16).astype(np.float64).reshape(5, -1, 4, 2, 2)
    sums = (halves[:, :, :, 0] + halves[:, :, :, 1]).reshape(5, -1)
    assert np.abs(sums - sums_ref).max() <= 1e-6 * np.abs(sums_ref).max()


# the simulator runs the kernel's inf - inf in numpy scalars (warns; the GPU does not)
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_activation_split_non_finite_rows():
    x = np.random.default_rng(14).standard_normal((3, 256)).astype(np.float32)
    x[0, 7] = np.nan
    x[1, 200] = -np.inf
    hx, _, xs = _split(x)
    np.testing.assert_array_equal(xs, split_reference(x)[2])
    assert xs[0] == 1 and xs[1] == 1 and xs[2] != 1
    v = _split_values(hx, xs)
    # inf - inf leaves NaN in the lo half: non-finite either way, as the float path
    assert np.isnan(v[0, 7]) and not np.isfinite(v[1, 200]) and np.isfinite(v[2]).all()
    assert np.isfinite(np.delete(v[:2], [7, 200], axis=1)).all()



# ------------------------------------------------------------------ GEMMs

def _random_tensor(qtype, e, rows, cols, rng, name):
    """Random bytes with sane fp16 scales: valid blocks of any type."""
    bsz, tsz = gguf.GGML_QUANT_SIZES[qtype]
    n = e * rows * cols // bsz
    if qtype == Q.F32:
        return ExpertTensor(name, qtype, e, rows, cols,
                            rng.standard_normal((e, rows, cols)).astype(np.float32))
    if qtype == Q.F16:
        raw = rng.standard_normal(n * bsz).astype(np.float16).view(np.uint8)
        return ExpertTensor(name, qtype, e, rows, cols, raw.reshape(e, rows, -1))
    b = rng.integers(0, 256, size=(n, tsz), dtype=np.uint8)
    scale = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q8_0: (0,)}[qtype]
    for off in scale:
        b[:, off:off + 2] = rng.uniform(0.002, 0.02, n).astype(np.float16).view(
            np.uint8).reshape(n, 2)
    return ExpertTensor(name, qtype, e, rows, cols, b.reshape(e, rows, -1))


def _gemm_reference(g, u, x, ids):
    """float64 rows by BucketPlan slot: silu(G x) * (U x), or W x_slot."""
    t, k = ids.shape
    plan = nm.BucketPlan.build(ids, np.ones(ids.shape, np.float32), g.num_experts)
    gd = g.dense().astype(np.float64)
    ud = None if u is None else u.dense().astype(np.float64)
    ref = np.empty((t * k, g.rows))
    for slot in range(t * k):
        p = plan.pair_of_slot[slot]
        e = ids[p // k, p % k]
        if ud is None:
            ref[slot] = gd[e] @ x[slot]
        else:
            a = gd[e] @ x[p // k]
            with np.errstate(over="ignore"):    # exp(-a) = inf: silu(a) = -0, as it should
                ref[slot] = a / (1 + np.exp(-a)) * (ud[e] @ x[p // k])
    return ref


# The GEMV and the integer tensor-core kernel over quantized weights read the
# activations as 16-bit codes (numba_moe.cuda.actquant: each within 1.5e-5 of
# the largest of its 32), 0.6e-5 to 4.4e-5 of relative error on these outputs
# (the bound for float math is 1e-4); the fp16 tensor-core kernel
# (Q4_K / Q6_K, tiled) reads 22-bit fp16 pairs: about 2e-7 (2e-6 for Q6_K,
# whose odd-scale part meets only the hi halves).  Float arithmetic
# elsewhere.
CODES_TOL = 1e-4
FLOAT_TOL = 1e-5


def _check_gemm(qtype, kernel, gate_up, e, rows, cols, t, k, seed, nt=None):
    rng = np.random.default_rng(seed)
    g = _random_tensor(qtype, e, rows, cols, rng, "gate")
    u = _random_tensor(qtype, e, rows, cols, rng, "up") if gate_up else None
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    x = rng.standard_normal((t if gate_up else t * k, cols)).astype(np.float32)
    out = _poison((t * k, rows), np.float32)
    got = expert_gemm(g, x, ids, up=u, kernel=kernel, out=out, tokens_per_pass=nt).copy_to_host()
    assert not np.isnan(got).any()
    codes = qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0)
    assert _rel(got, _gemm_reference(g, u, x, ids)) < (CODES_TOL if codes else FLOAT_TOL)


# (qtype, kernel, gate_up, GEMV tokens per pass: None = the forward's pick)
SIM_GEMMS = [(Q.Q4_K, "gemv", True, 4), (Q.Q5_K, "gemv", True, 1),
             (Q.Q6_K, "gemv", False, None), (Q.Q8_0, "gemv", True, 2),
             (Q.F16, "gemv", False, 1), (Q.Q4_K, "tiled", True, None),
             (Q.Q6_K, "tiled", False, None), (Q.Q5_K, "tiled", False, None),
             (Q.Q8_0, "tiled", True, None), (Q.F16, "tiled", True, None)]


@pytest.mark.filterwarnings("ignore:.*(no native kernel|dequantiz)")
@pytest.mark.parametrize("qtype,kernel,gate_up,nt", SIM_GEMMS,
                         ids=lambda v: v.name if isinstance(v, Q) else str(v))
def test_gemm_matches_reference(qtype, kernel, gate_up, nt, monkeypatch):
    # rows 12: a partial row group; 3 tokens x 2 experts of 3 (passes of nt
    # tokens with a partial last one); 1 KiB of shared memory stages 256
    # columns in tiles
    monkeypatch.setattr(CUDA_LAUNCH, "gemv_shared_bytes", 1024)
    _check_gemm(qtype, kernel, gate_up, 3, 12, 256, 3, 2, seed=int(qtype), nt=nt)


@pytest.mark.parametrize("row_fast", [False, True], ids=["token-blocks-fast", "row-blocks-fast"])
@pytest.mark.parametrize("qtype,gate_up", [(Q.Q4_K, True), (Q.Q5_K, False)],
                         ids=["fp16-Q4_K-gate_up", "int-Q5_K"])
def test_tiled_block_orders(qtype, gate_up, row_fast, monkeypatch):
    # both walks of the one-dimensional grid of the tensor-core kernels:
    # 80 rows (two row blocks, the second partial) x several token blocks;
    # a block taken twice or never leaves NaN poison or wrong rows
    monkeypatch.setattr(CUDA_LAUNCH, "row_fast_bytes", -1 if row_fast else 1 << 40)
    _check_gemm(qtype, "tiled", gate_up, 3, 80, 256, 5, 2, seed=8)


def test_fp16_down_takes_plan_blocks_in_parts(monkeypatch):
    # the down projection reads a plan of 16-token blocks as 8-token parts:
    # 26 pairs on 3 experts fill some second parts and leave others all
    # padding (those exit); a part taken twice or never leaves NaN poison
    import numba_moe.cuda.matmul as matmul

    monkeypatch.setattr(CUDA_LAUNCH, "tile_m", 16)
    monkeypatch.setattr(CUDA_LAUNCH, "hmma_down_tile_m", 8)
    built = []
    make = matmul.hmma_kernel
    monkeypatch.setattr(matmul, "hmma_kernel", lambda *a: built.append(a[2:]) or make(*a))
    _check_gemm(Q.Q6_K, "tiled", False, 3, 16, 256, 13, 2, seed=12)
    assert built == [(8, 1)]


def _check_down_rows_144(qtype, tile, launch, seed, monkeypatch):
    # 144 rows make a full row block of 128 and a partial one; 5 pairs on 2
    # experts fill the token blocks partly.  A row or token taken twice or
    # never leaves NaN poison or a wrong row.  ``launch``: the (threads, row
    # blocks) the kernel must get.
    import numba_moe.cuda.hmma as hmma
    import numba_moe.cuda.matmul as matmul

    assert hmma.hmma_layout(144, tile, False) == launch
    monkeypatch.setattr(CUDA_LAUNCH, "tile_m", tile)
    monkeypatch.setattr(CUDA_LAUNCH, "hmma_down_tile_m", tile)
    built = []
    make = matmul.hmma_kernel
    monkeypatch.setattr(matmul, "hmma_kernel", lambda *a: built.append(a[2:]) or make(*a))
    _check_gemm(qtype, "tiled", False, 2, 144, 256, 5, 1, seed=seed)
    assert built == [(tile, 0)]


def test_fp16_down_blocks_of_eight_warps(monkeypatch):
    # blocks of 8 warps of one row tile (what down projections with 32-token
    # tiles take), here on 8-token tiles: the simulator runs 32-token ones
    # too slowly
    import numba_moe.cuda.hmma as hmma

    monkeypatch.setattr(hmma, "_cache", {})
    monkeypatch.setattr(hmma, "block_warps", lambda tile_m, gate_up: 4 if gate_up else 8)
    monkeypatch.setattr(hmma, "row_tiles", lambda tile_m, gate_up: 1)
    _check_down_rows_144(Q.Q6_K, 8, (256, 2), 14, monkeypatch)


@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q4_K], ids=lambda q: q.name)
def test_fp16_down_small_tiles_two_row_tiles(qtype, monkeypatch):
    # down projections with 8- and 16-token tiles: 4 warps of two 16-row
    # tiles, 128 rows a block; the partial block's warp reads rows past the
    # end in its second tile
    import numba_moe.cuda.hmma as hmma

    assert [hmma.row_tiles(t, False) for t in (8, 16, 32)] == [2, 2, 1]
    assert hmma.row_tiles(8, True) == hmma.row_tiles(16, True) == 1
    assert hmma.min_blocks(8, False) == 3
    _check_down_rows_144(qtype, 8, (128, 2), 15, monkeypatch)


@gpu_only
@pytest.mark.cuda
def test_fp16_down_32_token_tiles_take_eight_warps(monkeypatch):
    import numba_moe.cuda.hmma as hmma

    assert hmma.block_warps(32, False) == 8 and hmma.block_warps(16, False) == 4
    assert hmma.block_warps(32, True) == 4
    _check_down_rows_144(Q.Q6_K, 32, (256, 2), 14, monkeypatch)


def test_down_parts_only_by_powers_of_two(monkeypatch):
    from numba_moe.cuda.matmul import down_parts

    monkeypatch.setattr(CUDA_LAUNCH, "hmma_down_tile_m", 16)
    assert [down_parts(t) for t in (8, 16, 32, 48, 64)] == [1, 1, 2, 1, 4]
    monkeypatch.setattr(CUDA_LAUNCH, "hmma_down_tile_m", 12)
    assert down_parts(48) == 1


@pytest.mark.parametrize("qtype,per_lane", [(Q.Q6_K, 1), (Q.Q6_K, 4), (Q.Q4_K, 2)],
                         ids=["Q6_K-8-lanes", "Q6_K-4-lanes", "Q4_K-8-lanes"])
def test_gemv_two_register_sets(qtype, per_lane, monkeypatch):
    # Plain GEMV, one token a pass: the loop alternates two sets of weight
    # words.  768 columns (24 chunks): a Q4_K lane walks chunks, a Q6_K lane
    # pairs of chunks (12 a row).  12 pairs on 8 lanes give lanes of 2 (sets
    # A, B, out at the loop's test) and of 1 (A, out at the mid-loop exit);
    # 4 lanes give 3 (A, B, A, out at the mid-loop exit), as do 24 chunks
    # on 8 lanes.
    monkeypatch.setattr(CUDA_LAUNCH, "gemv_min_warps", 1)
    monkeypatch.setattr(CUDA_LAUNCH, "gemv_chunks_per_lane", per_lane)
    monkeypatch.setattr(CUDA_LAUNCH, "gemv_shared_bytes", 1024)
    _check_gemm(qtype, "gemv", False, 3, 12, 768, 3, 2, seed=5, nt=1)


@pytest.mark.parametrize("stage", [8, 4], ids=["stage8", "stage4"])
@pytest.mark.parametrize("rescale", [False, True], ids=["running-sums", "rescaled"])
@pytest.mark.parametrize("qtype,gate_up", [(Q.Q4_K, True), (Q.Q6_K, False)],
                         ids=["Q4_K-gate_up", "Q6_K"])
def test_fp16_kernel_block_scales(qtype, gate_up, rescale, stage, monkeypatch):
    # Rows of 2 blocks whose d spans 1e-4 .. 50 or is 0 (for Q4_K with dmin
    # still set), through both ways the fp16 kernel applies block scales: a
    # second set of running sums, or the sum kept in units of the last
    # nonzero d (each rescale and each skipped block taken).  Stages of 8
    # and 4 steps: with 4, a Q6_K group of 8 steps sharing words spans two
    # stages (the 64-token tiles on a GPU).
    import numba_moe.cuda.hmma as hmma
    import numba_moe.cuda.matmul as matmul

    monkeypatch.setattr(hmma, "_cache", {})
    monkeypatch.setattr(hmma, "rescaled", lambda tile_m, gate_up: rescale)
    monkeypatch.setattr(hmma, "stage_steps", lambda tile_m: stage)
    used = []
    make = matmul.hmma_kernel
    monkeypatch.setattr(matmul, "hmma_kernel", lambda *a: used.append(a[0]) or make(*a))
    rng = np.random.default_rng(23)
    e, rows, cols, t, k = 3, 12, 512, 3, 2
    tensors = []
    for name in ("gate", "up")[:1 + gate_up]:
        w = _random_tensor(qtype, e, rows, cols, rng, name)
        blocks = w.data.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
        d = rng.choice([0.0, 1e-4, 3e-3, 0.02, 0.7, 50.0], len(blocks)).astype(np.float16)
        d[::5] = 0
        off = 208 if qtype == Q.Q6_K else 0
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
        tensors.append(w)
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    x = rng.standard_normal((t if gate_up else t * k, cols)).astype(np.float32)
    g, u = tensors[0], (tensors[1] if gate_up else None)
    got = expert_gemm(g, x, ids, up=u, kernel="tiled", out=_poison((t * k, rows), np.float32))
    assert used == [qtype]
    ref = _gemm_reference(g, u, x, ids)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    # float32 accumulation of exact fp16 products: ~2e-7; Q6_K leaves out the
    # odd-scale term against the activations' lo halves (relative 2^-12 of
    # a term 1 / |sc| of the sum): ~2e-6.  The codes' bound is 1e-4.
    assert _rel(got.copy_to_host(), ref) < (2e-6 if qtype == Q.Q4_K else 1e-5)


@pytest.mark.parametrize("kernel,qtype,cols", [("gemv", Q.Q8_0, 64), ("tiled", Q.Q8_0, 64),
                                               ("tiled", Q.Q4_K, 256)],
                         ids=["gemv-Q8_0", "tiled-Q8_0", "tiled-Q4_K"])
def test_gemm_float_kernels_without_integer_units(kernel, qtype, cols, monkeypatch):
    # a GPU without dp4a / integer mma runs quantized weights on the float kernels
    import numba_moe.cuda.matmul as matmul

    monkeypatch.setattr(matmul, "integer_kernels", lambda: (False, False))

    def refuse(*args):
        raise AssertionError("integer kernel used on a device without it")

    monkeypatch.setattr(matmul, "qgemv_kernel", refuse)
    monkeypatch.setattr(matmul, "mma_kernel", refuse)
    monkeypatch.setattr(matmul, "hmma_kernel", refuse)
    monkeypatch.setattr(CUDA_LAUNCH, "gemv_shared_bytes", 1024)
    rng = np.random.default_rng(21)
    g = _random_tensor(qtype, 2, 8, cols, rng, "gate")
    u = _random_tensor(qtype, 2, 8, cols, rng, "up")
    ids = np.array([[0, 1], [1, 0]], np.int32)
    x = rng.standard_normal((2, cols)).astype(np.float32)
    got = expert_gemm(g, x, ids, up=u, kernel=kernel, out=_poison((4, 8), np.float32))
    assert _rel(got.copy_to_host(), _gemm_reference(g, u, x, ids)) < FLOAT_TOL


def test_tiled_activation_format_by_type():
    # Q4_K / Q6_K: fp16 pairs for the fp16 tensor-core kernel; Q5_K / Q8_0:
    # 16-bit codes for the integer one; the GEMV always reads codes
    from numba_moe.cuda.matmul import uses_codes, uses_split
    from numba_moe.cuda.weights import upload_weights

    rng = np.random.default_rng(22)
    for qtype, split in ((Q.Q4_K, True), (Q.Q6_K, True), (Q.Q5_K, False), (Q.Q8_0, False)):
        w = upload_weights(_random_tensor(qtype, 1, 4, 256, rng, "w"))
        assert (uses_split(w, False), uses_codes(w, False)) == (split, not split)
        assert (uses_split(w, True), uses_codes(w, True)) == (False, True)


@gpu_only
@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:.*(no native kernel|dequantiz)")
@pytest.mark.parametrize("kernel", ["gemv", "tiled"])
@pytest.mark.parametrize("gate_up", [True, False])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.F16])
def test_gemm_large_matches_reference(qtype, kernel, gate_up):
    _check_gemm(qtype, kernel, gate_up, 16, 200, 1024, 40, 4, seed=int(qtype))


@gpu_only
@pytest.mark.cuda
@pytest.mark.parametrize("nt", [1, 2, 4, 8])
@pytest.mark.parametrize("qtype,gate_up,cols", [(Q.Q4_K, True, 2048), (Q.Q6_K, False, 768)])
def test_gemv_tokens_per_pass(qtype, gate_up, cols, nt):
    # 37 tokens x 4 of 16 experts: about 9 a expert, several passes and tiles
    _check_gemm(qtype, "gemv", gate_up, 16, 96, cols, 37, 4, seed=nt, nt=nt)


def test_gemm_rejects_mismatched_x():
    rng = np.random.default_rng(0)
    g = _random_tensor(Q.Q8_0, 2, 4, 64, rng, "w")
    with pytest.raises(MoEError, match="x must have shape"):
        expert_gemm(g, np.zeros((3, 64), np.float32), np.zeros((2, 1), np.int32))


# ------------------------------------------------------------------ combine

@pytest.mark.parametrize("t,k,width", [(3, 2, 8)] + ([] if SIMULATOR else [(257, 8, 2048)]))
def test_combine_matches_reference(t, k, width):
    rng = np.random.default_rng(t)
    rows = rng.standard_normal((t * k, width)).astype(np.float32)
    pbt = rng.permutation(t * k).astype(np.int32).reshape(t, k)
    w = rng.random((t, k)).astype(np.float32)
    out = _poison((t, width), np.float32)
    got = combine(rows, pbt, w, out=out).copy_to_host()
    ref = np.einsum("tk,tkh->th", w.astype(np.float64), rows[pbt].astype(np.float64))
    assert _rel(got, ref) < 1e-6


@pytest.mark.parametrize("t,k,width",
                         [(3, 2, 8), (2, 3, 8)] + ([] if SIMULATOR else [(9, 8, 2048)]))
def test_combine_by_pair_reads_slot_of_each_pair(t, k, width):
    # the plan of one slot per pair: pair p in slot p, and pairs_by_token is
    # not read (here it holds other, valid slots: reading it gives another
    # sum); the kernel with its pair loop unrolled for this K
    from numba_moe.config import CUDA_LAUNCH
    from numba_moe.cuda.combine import SHARED_NONE, launch_combine

    rng = np.random.default_rng(t * k)
    rows = rng.standard_normal((t * k, width)).astype(np.float32)
    w = rng.random((t, k)).astype(np.float32)
    out = _poison((t, width), np.float32)
    d_rows, d_w = cuda.to_device(rows.ravel()), cuda.to_device(w.ravel())
    other = cuda.to_device(np.arange(t * k, dtype=np.int32)[::-1].copy())
    launch_combine(d_rows, other, d_w, t, k, width, SHARED_NONE, d_rows, d_w, 0, 0,
                   out.reshape(out.size), CUDA_LAUNCH.threads, 0, by_pair=True)
    ref = np.einsum("tk,tkh->th", w.astype(np.float64),
                    rows.reshape(t, k, width).astype(np.float64))
    assert _rel(out.copy_to_host(), ref) < 1e-6


def test_combine_rejects_bad_slots():
    with pytest.raises(MoEError, match="pairs_by_token"):
        combine(np.zeros((2, 4), np.float32), np.array([[0, 2]], np.int32),
                np.ones((1, 2), np.float32))


# ---------------------------------------------------------------- benchmark


def test_cache_flush_runs_before_each_timing():
    # benchmarks/bench_cuda.py times cold-L2 replays this way: the flush (a
    # device copy on the timed stream) is enqueued ahead of each timing,
    # outside its events
    from numba_moe.bench import CacheFlush, cuda_event_seconds

    stream = cuda.stream()
    flush = CacheFlush(stream, 4096)
    src = np.random.default_rng().integers(0, 256, 4096, dtype=np.uint8)
    flush._src.copy_to_device(src, stream=stream)
    calls = []

    def before():
        calls.append("flush")
        flush()

    cuda_event_seconds(lambda: calls.append("fn"), 3, stream, before=before)
    assert calls == ["flush", "fn"] * 3
    assert np.array_equal(flush._dst.copy_to_host(stream=stream), src)

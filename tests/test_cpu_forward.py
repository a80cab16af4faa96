"""The CPU forward end to end, on synthetic files of every architecture and type.

Fast path vs ``moe_forward_float64`` (gguf-py dequantization, float64):
relative error (max |diff| / max |ref|) <= 5e-3 when any projection is a
native block type (activations are quantized to 12 bits), <= 1e-5 when all
are dense.
"""
import threading

import numpy as np
import pytest

import numba_moe as nm
from numba_moe import config, profile
from numba_moe.cpu import moe_forward, simd, touched_expert_bytes
from numba_moe.cpu.workspace import workspace_for
from numba_moe.reference import moe_forward_float64, moe_forward_reference

pytestmark = pytest.mark.filterwarnings("ignore:.*no native kernel")

NATIVE_TOL = 5e-3
DENSE_TOL = 1e-5
TOKENS = [1, 7, 64, 300]
ARCHS = ["qwen3moe", "qwen2moe", "olmoe", "llama", "deepseek2"]
# (gate, up, down) storage types; the last two take the dense float32 path.
TYPES = {
    "q4k_q6k": ("Q4_K", "Q4_K", "Q6_K"),
    "q5k": ("Q5_K", "Q5_K", "Q5_K"),
    "q6k": ("Q6_K", "Q6_K", "Q6_K"),
    "q8_0": ("Q8_0", "Q8_0", "Q8_0"),
    "q4_0": ("Q4_0", "Q4_0", "Q4_0"),
    "f32": ("F32", "F32", "F32"),
}
DENSE_TYPES = ("q4_0", "f32")


def rel_err(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def tokens(num_tokens, hidden, seed=0):
    return np.random.default_rng(seed).standard_normal((num_tokens, hidden)).astype(np.float32)


def poison(layer):
    """NaN-fill every per-slot buffer of the layer's workspace, so a kernel
    that skips an element shows up as NaN in the output."""
    ws = workspace_for(layer)
    for branch in (ws.routed, ws.shared):
        if branch is not None and branch.capacity:
            branch.h.fill(np.nan)
            branch.y.fill(np.nan)


@pytest.fixture(scope="module")
def layer_of(make_model):
    cache = {}

    def get(arch="qwen3moe", types="q4k_q6k", **kw):
        key = (arch, types, tuple(sorted(kw.items())))
        if key not in cache:
            g, u, d = TYPES[types]
            name = f"cpu_{arch}_{types}" + "".join(f"_{k}{v}" for k, v in sorted(kw.items()))
            cache[key] = nm.load_moe_layer(make_model(name, arch=arch, gate_type=g, up_type=u,
                                                      down_type=d, **kw), layer=0)
        return cache[key]

    return get


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_matches_float64(layer_of, arch, num_tokens):
    layer = layer_of(arch)
    x = tokens(num_tokens, layer.hidden_size, seed=num_tokens)
    moe_forward(layer, x[:1])
    poison(layer)
    y = moe_forward(layer, x)
    assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all()
    assert rel_err(y, moe_forward_float64(layer, x)) <= NATIVE_TOL


@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("types", sorted(TYPES))
def test_every_type_matches_float64(layer_of, types, num_tokens):
    arch = "qwen2moe" if types == "q8_0" else "qwen3moe"  # shared expert in one native type
    layer = layer_of(arch, types)
    x = tokens(num_tokens, layer.hidden_size, seed=100 + num_tokens)
    poison(layer)
    y = moe_forward(layer, x)
    tol = DENSE_TOL if types in DENSE_TYPES else NATIVE_TOL
    assert rel_err(y, moe_forward_float64(layer, x)) <= tol


@pytest.mark.parametrize("use_simd", [False, True], ids=["portable", "simd"])
def test_one_token_portable_and_simd_paths(layer_of, use_simd):
    """``NUMBA_MOE_SIMD=0`` keeps the portable kernels; on an AVX-512 host
    the default takes the AVX-512 one-token dots (:mod:`numba_moe.cpu.simd`)."""
    layer = layer_of("qwen3moe")
    x = tokens(1, layer.hidden_size, seed=8)
    with config.override(simd=use_simd):
        poison(layer)
        y = moe_forward(layer, x)
    assert rel_err(y, moe_forward_float64(layer, x)) <= NATIVE_TOL
    with config.override(simd=not use_simd):
        assert rel_err(y, moe_forward(layer, x)) <= 1e-5


@pytest.mark.skipif(not simd.AVAILABLE, reason="host without AVX-512")
def test_simd_token_output_does_not_depend_on_the_batch(layer_of):
    """AVX-512: experts with few tokens read their rows from the blocks, the
    others through the decode buffer; both round identically, so a token's
    output is bit for bit the same alone or in any batch."""
    layer = layer_of("qwen3moe")
    x = tokens(48, layer.hidden_size, seed=9)
    with config.override(simd=True):
        batch = moe_forward(layer, x)
        np.testing.assert_array_equal(moe_forward(layer, x[:5]), batch[:5])
        for i in (0, 17, 47):
            np.testing.assert_array_equal(moe_forward(layer, x[i:i + 1]), batch[i:i + 1])


def test_fused_gate_up_and_sigmoid_grouped_routing(layer_of):
    layer = layer_of("deepseek2", fused_gate_up=True, gating_func="sigmoid", n_group=4,
                     topk_group=2, weights_scale=2.5, norm_topk_prob=True)
    assert layer.gate_up_fused is not None and layer.selection_bias is not None
    x = tokens(33, layer.hidden_size, seed=5)
    assert rel_err(moe_forward(layer, x), moe_forward_float64(layer, x)) <= NATIVE_TOL


def test_routing_identical_to_reference_path(layer_of):
    layer = layer_of("qwen2moe")
    x = tokens(64, layer.hidden_size, seed=6)
    moe_forward(layer, x)
    ws = workspace_for(layer)
    r = layer.route(x)
    np.testing.assert_array_equal(ws.ids[:64], r.expert_ids)
    np.testing.assert_array_equal(ws.weights[:64], r.expert_weights)
    # Same experts as the layer's BLAS routing too (logits differ by rounding only).
    np.testing.assert_array_equal(np.sort(layer.route(x).expert_ids), np.sort(r.expert_ids))
    ref = moe_forward_reference(layer, x)
    assert rel_err(ref, moe_forward_float64(layer, x)) <= DENSE_TOL
    with config.override(path="reference"):
        np.testing.assert_array_equal(layer(x), ref)
    assert rel_err(layer(x), ref) <= NATIVE_TOL


def test_scratch_grows_and_shrinking_batches_stay_correct(layer_of):
    layer = layer_of("olmoe")
    for n in (1, 300, 7, 64, 2):
        x = tokens(n, layer.hidden_size, seed=n)
        poison(layer)
        assert rel_err(moe_forward(layer, x), moe_forward_float64(layer, x)) <= NATIVE_TOL
    assert workspace_for(layer).capacity >= 300


def test_nan_token_propagates_to_its_row_only(layer_of):
    layer = layer_of("qwen3moe")
    x = tokens(5, layer.hidden_size, seed=7)
    x[2, 17] = np.nan
    y = moe_forward(layer, x)
    assert np.isnan(y[2]).all()
    assert np.isfinite(np.delete(y, 2, axis=0)).all()


def test_two_python_threads_on_one_layer(layer_of):
    layer = layer_of("llama")
    xs = [tokens(n, layer.hidden_size, seed=n) for n in (3, 40, 9, 64)]
    want = [moe_forward(layer, x) for x in xs]
    got = [None] * len(xs)

    def run(i):
        for _ in range(3):
            got[i] = moe_forward(layer, xs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_profile_records_every_phase(layer_of):
    layer = layer_of("qwen3moe")
    x = tokens(4, layer.hidden_size, seed=8)
    with config.override(profile=True):
        profile.reset()
        moe_forward(layer, x)
        snap = profile.snapshot()
    profile.reset()
    assert set(profile.PHASES) <= set(snap)
    assert all(snap[p]["calls"] == 1 for p in profile.PHASES)


def test_touched_expert_bytes(layer_of):
    layer = layer_of("qwen2moe")
    ids = np.array([[0, 3], [3, 5], [0, 5]], dtype=np.int32)
    shared = sum(t.nbytes for t in (layer.shared.gate, layer.shared.up, layer.shared.down))
    assert touched_expert_bytes(layer, ids) == 3 * layer.expert_bytes() + shared


def test_input_validation(layer_of):
    layer = layer_of("qwen3moe")
    with pytest.raises(nm.MoEError, match="x"):
        moe_forward(layer, tokens(2, layer.hidden_size).astype(np.float64))
    with pytest.raises(nm.MoEError, match="x"):
        moe_forward(layer, tokens(2, layer.hidden_size + 1))

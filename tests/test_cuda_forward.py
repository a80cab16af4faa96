"""``layer(x, device="cuda")`` against the float64 reference.

Simulator runs use Q8_0 layers of width 64 (every kernel, small enough for
simulated threads) and one 256-wide Q4_K / Q6_K layer on the tiled path; the
larger k-quant layers, CUDA graphs, growing batches and foreign device arrays
run on a real GPU only.
"""
import cuda_backend  # noqa: F401  (must precede numba.cuda)
import gguf
import numpy as np
import pytest
from cuda_backend import gpu_only, need_cuda

import numba_moe as nm
from numba_moe.errors import MoEError
from numba_moe.reference import moe_forward_float64

# grouped launches size their grids for the worst case; idle blocks exit
pytestmark = [need_cuda, pytest.mark.filterwarnings("ignore:.*Grid size")]

if cuda_backend.usable:
    from numba import cuda

    from numba_moe.config import CUDA_LAUNCH

Q8 = dict(gate_type="Q8_0", up_type="Q8_0", down_type="Q8_0", hidden_size=64,
          expert_intermediate=64, num_experts=8, top_k=2)
ARCHS = {
    "qwen3moe": dict(arch="qwen3moe", **Q8),
    "qwen2moe": dict(arch="qwen2moe", shared_intermediate=64, **Q8),
    "deepseek2": dict(arch="deepseek2", gating_func="sigmoid", n_group=4, topk_group=2,
                      selection_bias=True, weights_scale=2.0, shared_intermediate=64, **Q8),
}


def _layer(make_model, name, **kw):
    return nm.load_moe_layer(make_model("cuda_" + name, **kw))


def _check_forward(layer, t, seed):
    x = np.random.default_rng(seed).standard_normal((t, layer.hidden_size)).astype(np.float32)
    y = layer(x, device="cuda")
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == x.shape
    ref = moe_forward_float64(layer, x)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-4


# the simulator runs the tiled path on the richest layout only (time)
PATHS = [(n, k) for n in sorted(ARCHS) for k in ("gemv", "tiled")
         if not (cuda_backend.SIMULATOR and k == "tiled" and n != "qwen2moe")]


@pytest.mark.parametrize("name,kernel", PATHS)
def test_forward_matches_reference(make_model, name, kernel, monkeypatch):
    if kernel == "tiled":
        monkeypatch.setattr(CUDA_LAUNCH, "gemv_max_tokens", 0)
    _check_forward(_layer(make_model, name, **ARCHS[name]), 3, seed=len(name))


@pytest.mark.parametrize("by_pair", [True, False])
@pytest.mark.parametrize("name", ["qwen3moe", "deepseek2"])
def test_forward_gemv_slots_by_pair_or_plan(make_model, name, by_pair, monkeypatch):
    # About one token an expert the GEMVs read the routing's ids as a plan
    # of one slot per pair and the plan kernel does not run (7 tokens, K=2,
    # 8 experts: some expert serves two tokens and is read twice); else the
    # plan's slots, an expert's tokens together
    import numba_moe.cuda.forward as forward

    monkeypatch.setattr(CUDA_LAUNCH, "pair_slots_max_mean", 1e9 if by_pair else 0.0)
    plans = []
    launch = forward.launch_plan
    monkeypatch.setattr(forward, "launch_plan", lambda *a: plans.append(1) or launch(*a))
    _check_forward(_layer(make_model, name, **ARCHS[name]), 7, seed=7)
    assert bool(plans) != by_pair


@pytest.mark.parametrize("by_pair", [True, False])
def test_forward_dense_experts_float_gemv(make_model, by_pair, monkeypatch):
    # float32 experts take the float GEMV, by pair slot or by the plan's slots
    import numba_moe.cuda.matmul as matmul

    monkeypatch.setattr(CUDA_LAUNCH, "pair_slots_max_mean", 1e9 if by_pair else 0.0)
    built = []
    make = matmul.gemv_kernel
    monkeypatch.setattr(matmul, "gemv_kernel",
                        lambda *a: built.append((a[1], a[-1])) or make(*a))
    layer = _layer(make_model, "dense", arch="qwen3moe", hidden_size=64, expert_intermediate=64,
                   num_experts=8, top_k=2, gate_type="F32", up_type="F32", down_type="F32")
    _check_forward(layer, 7, seed=11)
    # (gate_up, by_pair) of the routed gate/up and down launches
    assert {(True, by_pair), (False, by_pair)} <= set(built)


@pytest.mark.parametrize("in_block,fits", [(True, True), (False, True), (True, False)])
def test_forward_kquants_gemv_by_pair(make_model, in_block, fits, monkeypatch):
    # Q4_K gate / up, Q6_K down on the integer GEMVs by pair slot (2 tokens,
    # K=2, 4 experts); the down GEMV (walking Q6_K chunk pairs) quantizes its
    # rows in shared memory, or reads the codes of a separate launch: when
    # told to, or when a row's codes would not fit a block's shared memory
    import numba_moe.cuda.forward as forward

    monkeypatch.setattr(CUDA_LAUNCH, "gemv_quantize_max_pairs", 8 if in_block else 0)
    if not fits:
        monkeypatch.setattr(forward, "quantize_fits", lambda n_chunks: False)
        in_block = False
    quantized = []
    launch = forward.launch_quantize
    monkeypatch.setattr(forward, "launch_quantize",
                        lambda *a: quantized.append(a[1]) or launch(*a))
    layer = _layer(make_model, "kq_gemv", arch="qwen3moe", hidden_size=256,
                   expert_intermediate=256, num_experts=4, top_k=2,
                   gate_type="Q4_K", up_type="Q4_K", down_type="Q6_K", init="random_blocks")
    _check_forward(layer, 2, seed=10)
    # the activations' codes: 4 pairs of 256 values, unless the GEMV makes
    # them (on a GPU the first call runs eagerly, then captures a graph)
    assert set(quantized) == (set() if in_block else {4 * 256})


def test_in_block_quantization_fits_shared_memory():
    from numba_moe.cuda.qgemv import quantize_fits, shared_bytes

    # 80 bytes of codes a 16-column group; a block gets 48 KiB
    assert shared_bytes(True, 24) == 48 * 80 and shared_bytes(False, 24) == 0
    assert quantize_fits(768 // 32) and quantize_fits(9824 // 32)
    # Mixtral's down rows (14336 values)
    assert not quantize_fits(9856 // 32) and not quantize_fits(14336 // 32)


def test_forward_kquants_tiled(make_model, monkeypatch):
    # Q4_K / Q6_K on the tiled path take the fp16 tensor-core kernel (its
    # simulator twin here), 256-wide rows
    import numba_moe.cuda.matmul as matmul

    monkeypatch.setattr(CUDA_LAUNCH, "gemv_max_tokens", 0)
    monkeypatch.setattr(CUDA_LAUNCH, "gemv_max_tokens_fp16", 0)
    built = []
    make = matmul.hmma_kernel
    monkeypatch.setattr(matmul, "hmma_kernel", lambda *a: built.append(a[:2]) or make(*a))
    layer = _layer(make_model, "kq_tiled", arch="qwen3moe", hidden_size=256,
                   expert_intermediate=256, num_experts=4, top_k=2,
                   gate_type="Q4_K", up_type="Q4_K", down_type="Q6_K", init="random_blocks")
    _check_forward(layer, 3, seed=9)
    Q = gguf.GGMLQuantizationType
    # on a GPU the first call also captures a graph: a second lookup per kernel
    assert set(built) == {(Q.Q4_K, True), (Q.Q6_K, False)}


@pytest.mark.parametrize("t", [3, 70])
def test_forward_router_column_splits(make_model, monkeypatch, t):
    # The tiled router splits its columns into partial planes that the
    # routing kernel adds, the shared expert's gate column included (qwen2moe
    # routes through logits of E + 1 columns); 70 tokens: several token blocks
    import numba_moe.cuda.forward as forward

    monkeypatch.setattr(CUDA_LAUNCH, "router_block_max_tokens", 0)
    monkeypatch.setattr(CUDA_LAUNCH, "router_gemv_max_tokens", 0)
    monkeypatch.setattr(CUDA_LAUNCH, "router_split_blocks", 1 << 20)
    parts = []
    launch = forward.launch_topk
    monkeypatch.setattr(forward, "launch_topk", lambda *a: parts.append(a[-1]) or launch(*a))
    _check_forward(_layer(make_model, "qwen2moe", **ARCHS["qwen2moe"]), t, seed=t)
    # hidden size 64: two 32-column chunks, one a part
    assert set(parts) == {2}


def test_routed_tile_follows_mean_tokens(monkeypatch):
    from numba_moe.cuda.forward import routed_tile

    monkeypatch.setattr(CUDA_LAUNCH, "tile_m_small", 32)
    means = [0.1, 1, 4, 4.5, 8, 16, 32, 64, 65, 256]
    assert [routed_tile(m, 64) for m in means] == [8, 8, 8, 16, 16, 32, 32, 32, 64, 64]
    assert [routed_tile(m, 16) for m in (1, 8, 16, 17)] == [8, 16, 16, 16]


def test_forward_device_input_stays_on_device(make_model):
    layer = _layer(make_model, "qwen3moe", **ARCHS["qwen3moe"])
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    ref = moe_forward_float64(layer, x)
    d_x = cuda.to_device(x)
    y = layer(x=d_x, device="cuda")
    assert not isinstance(y, np.ndarray) and tuple(y.shape) == (2, 64)
    assert np.linalg.norm(y.copy_to_host() - ref) / np.linalg.norm(ref) < 1e-4
    out = cuda.to_device(np.full((2, 64), np.nan, np.float32))
    assert nm.cuda.moe_forward_cuda(layer, d_x, out=out) is out
    np.testing.assert_array_equal(out.copy_to_host(), y.copy_to_host())


def test_forward_rejects_bad_input(make_model):
    layer = _layer(make_model, "qwen3moe", **ARCHS["qwen3moe"])
    bad = [(np.zeros((2, 64), np.float64), "dtype"), (np.zeros((2, 63), np.float32), "shape"),
           (np.zeros((0, 64), np.float32), "T >= 1"), (np.zeros((64, 2), np.float32).T, "contig"),
           ([[0.0] * 64], "numpy array"),
           # every other column: strides (512, 8) (numba's .T copies on a GPU)
           (cuda.to_device(np.ones((2, 128), np.float32))[:, ::2], "contig"),
           (cuda.to_device(np.ones((2, 64), np.float64)), "dtype")]
    for x, what in bad:
        with pytest.raises(MoEError, match=what):
            layer(x, device="cuda")
    with pytest.raises(MoEError, match="out"):
        nm.cuda.moe_forward_cuda(layer, cuda.to_device(np.zeros((2, 64), np.float32)),
                                 out=cuda.device_array((3, 64), np.float32))


def test_interface_arg_reads_layout_stream_and_mask():
    # the forward reads device arrays from their __cuda_array_interface__
    from numba_moe.cuda.arrays import interface_arg

    def arg(**kw):
        return interface_arg(dict(dict(shape=(3, 4), typestr="<f4", data=(4096, False),
                                       version=3), **kw))

    a = arg()
    assert (a.ptr, a.shape, a.dtype, a.contiguous, a.stream) == (4096, (3, 4), np.float32,
                                                                 True, None)
    assert arg(strides=(16, 4)).contiguous and not arg(strides=(4, 12)).contiguous
    assert not arg(strides=(32, 8)).contiguous
    # a dimension of one element may carry any stride
    assert arg(shape=(1, 4), strides=(999, 4)).contiguous
    assert arg(shape=(3, 1), strides=(4, 8)).contiguous
    assert arg(stream=7).stream == 7
    assert arg(typestr=">f4").dtype != np.float32
    with pytest.raises(MoEError, match="masked"):
        arg(mask=(8192, False))


def test_forward_rejects_batches_past_the_plan_limits(make_model, monkeypatch):
    # the plan kernel's packed scan bounds the batch (checked before any launch)
    import numba_moe.cuda.plan as plan

    layer = _layer(make_model, "qwen3moe", **ARCHS["qwen3moe"])
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    bs = CUDA_LAUNCH.tile_m
    monkeypatch.setattr(plan, "PLAN_MAX_SLOTS", 4 * 2 + 8 * (bs - 1))
    layer(x[:4], device="cuda")
    with pytest.raises(MoEError, match="split the batch"):
        layer(x, device="cuda")
    monkeypatch.setattr(plan, "PLAN_MAX_EXPERTS", 7)
    with pytest.raises(MoEError, match="num_experts=8"):
        nm.cuda.upload(layer)


# ------------------------------------------------------------ real GPU only

KQ = dict(hidden_size=1024, expert_intermediate=512, num_experts=32, top_k=4, init="random_blocks")


@gpu_only
@pytest.mark.cuda
@pytest.mark.parametrize("types", [("Q4_K", "Q6_K"), ("Q5_K", "Q8_0")])
def test_forward_kquants_all_batch_sizes(make_model, types):
    layer = _layer(make_model, "kq_" + "_".join(types), arch="qwen3moe", gate_type=types[0],
                   up_type=types[0], down_type=types[1], **KQ)
    # first call per T runs eagerly and captures; the second replays the graph
    for t in (1, 4, 16, 64, 300, 1, 64):
        _check_forward(layer, t, seed=t)


@gpu_only
@pytest.mark.cuda
def test_forward_shared_expert_and_fused_gate_up(make_model):
    layer = _layer(make_model, "kq_shared", arch="qwen2moe", shared_intermediate=768,
                   fused_gate_up=True, **KQ)
    for t in (3, 3, 100, 100):
        _check_forward(layer, t, seed=t)


@gpu_only
@pytest.mark.cuda
def test_forward_waits_for_the_producer_stream(make_model):
    from numba import uint32

    # x written by a kernel on another stream that first sleeps for a few
    # milliseconds (x's interface names that stream): the layer's copy of x
    # must wait for it on the device, else it reads the NaNs x held before
    @cuda.jit
    def late_copy(src, dst):
        if cuda.threadIdx.x == 0:
            for _ in range(4000):
                cuda.nanosleep(uint32(1000))
        cuda.syncthreads()
        for i in range(cuda.grid(1), src.size, cuda.gridsize(1)):
            dst[i] = src[i]

    layer = _layer(make_model, "kq_q4", arch="qwen3moe", **KQ)
    other = cuda.stream()
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((64, 1024)).astype(np.float32)
        d_src = cuda.to_device(x.reshape(-1))
        d_x = cuda.to_device(np.full((64, 1024), np.nan, np.float32), stream=other)
        other.synchronize()
        late_copy[1, 256, other](d_src, d_x.reshape(-1))
        y = layer(d_x, device="cuda")
        ref = moe_forward_float64(layer, x)
        assert np.linalg.norm(y.copy_to_host() - ref) / np.linalg.norm(ref) < 1e-4
    assert layer(d_x, device="cuda") is y
    out = cuda.to_device(np.full((64, 1024), np.nan, np.float32), stream=other)
    assert nm.cuda.moe_forward_cuda(layer, d_x, out=out) is out
    np.testing.assert_array_equal(out.copy_to_host(), y.copy_to_host())


@gpu_only
@pytest.mark.cuda
def test_forward_torch_or_cupy_input(make_model):
    layer = _layer(make_model, "kq_q4", arch="qwen3moe", **KQ)
    x = np.random.default_rng(9).standard_normal((5, 1024)).astype(np.float32)
    ref = moe_forward_float64(layer, x)
    try:
        import torch

        d_x = torch.from_numpy(x).cuda()
        back = lambda y: torch.as_tensor(y, device="cuda").cpu().numpy()  # noqa: E731
    except ImportError:
        cp = pytest.importorskip("cupy")
        d_x = cp.asarray(x)
        back = lambda y: cp.asnumpy(cp.asarray(y))  # noqa: E731
    y = back(layer(d_x, device="cuda"))
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-4

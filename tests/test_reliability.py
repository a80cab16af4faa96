"""Reliability: bad arguments, hostile files, NaN/Inf and large shapes.

Numba kernels do no bounds checks, so every public entry point validates
before launching one.  These tests feed each entry point what it must refuse
and check for a :class:`~numba_moe.errors.MoEError` (``GGUFError`` for files)
whose message names the argument, key or tensor; they craft corrupt headers
byte by byte; they check NaN/Inf propagation (documented: a NaN or Inf in a
token row makes that row's output NaN, other rows are untouched; a non-finite
weight block poisons exactly the tokens routed to its expert); and they run
index arithmetic past 2**31 elements.

Cases that would crash the interpreter run in a subprocess.
"""
import os
import struct
import subprocess
import sys
import textwrap
import warnings

import gguf
import numpy as np
import pytest

import numba_moe as nm
from numba_moe.config import override, parse_env
from numba_moe.cpu import combine, grouped_down, grouped_gate_up, quantize_rows
from numba_moe.errors import GGUFError, MoEError
from numba_moe.gguf_io import GGUFFile, copy_metadata

Q = gguf.GGMLQuantizationType
E, K, H, I = 8, 2, 256, 256


@pytest.fixture(scope="module")
def qwen(make_model):
    return make_model("qwen3moe", arch="qwen3moe")


@pytest.fixture(scope="module")
def layer(qwen):
    return nm.load_moe_layer(qwen)


@pytest.fixture(scope="module")
def ds2(make_model):
    return make_model("rel_ds2", arch="deepseek2", n_group=4, topk_group=2,
                      gating_func="sigmoid", shared_intermediate=512, norm_topk_prob=True)


def _x(t=3, seed=0, width=H):
    return np.random.default_rng(seed).standard_normal((t, width)).astype(np.float32)


def _isolated(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (for inputs that could crash it)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


# --------------------------------------------------------------------------
# 1. argument validation, entry point by entry point
# --------------------------------------------------------------------------

def _bad_x_cases():
    wide = _x(3, width=2 * H)
    return [
        ([[0.0] * H], "x: expected a numpy.ndarray"),
        (_x().astype(np.float64), "x: expected dtype float32, got float64"),
        (_x().astype(np.float16), "x: expected dtype float32, got float16"),
        (_x().astype(">f4"), "x: expected dtype float32"),
        (np.ones((3, H), np.int32), "x: expected dtype float32, got int32"),
        (_x()[0], r"x: expected shape \[T, 256\], got \[256\]"),
        (_x()[None], r"x: expected shape \[T, 256\], got \[1, 3, 256\]"),
        (_x(width=128), r"x: expected shape \[T, 256\], got \[3, 128\]"),
        (_x(0), r"x: expected at least one token \(T >= 1\)"),
        (wide[:, ::2], "x: expected a C-contiguous array"),
        (np.asfortranarray(_x(4)), "x: expected a C-contiguous array"),
        (np.ma.masked_array(_x(), mask=np.zeros((3, H), bool)), "x: expected a plain numpy"),
    ]


@pytest.mark.parametrize("x,match", _bad_x_cases())
def test_layer_rejects_bad_x(layer, x, match):
    with pytest.raises(MoEError, match=match):
        layer(x)
    with pytest.raises(MoEError, match=match):
        layer.route(x)
    with override(path="reference"), pytest.raises(MoEError, match=match):
        layer(x)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")   # np.matrix
def test_layer_takes_ndarray_subclasses_as_plain_arrays(layer, tmp_path):
    x = _x(4, seed=8)
    want = layer(x)
    mm = np.memmap(tmp_path / "x.bin", dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    for sub in (np.matrix(x), mm):
        y = layer(sub)
        assert type(y) is np.ndarray
        np.testing.assert_array_equal(y, want)
        np.testing.assert_array_equal(layer.route(sub).expert_ids, layer.route(x).expert_ids)


def test_layer_rejects_bad_device(layer):
    with pytest.raises(MoEError, match="device='tpu': expected 'cpu' or 'cuda'"):
        layer(_x(), device="tpu")
    with pytest.raises(MoEError, match="device='gpu'"):
        layer.to("gpu")


_LOGITS = np.random.default_rng(3).standard_normal((5, E)).astype(np.float32)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=0), r"top_k must be in \[1, 8\], got 0"),
    (dict(top_k=9), r"top_k must be in \[1, 8\], got 9"),
    (dict(top_k=-1), r"top_k must be in \[1, 8\], got -1"),
    (dict(top_k=True), "top_k must be an integer, got True"),
    (dict(top_k=2.0), "top_k must be an integer, got 2.0"),
    (dict(top_k=2, gating="relu"), "gating must be one of"),
    (dict(top_k=2, norm_topk_prob="yes"), "norm_topk_prob must be a bool"),
    (dict(top_k=2, scale="2"), "scale must be a real number"),
    (dict(top_k=2, n_group=3), "n_group=3 must divide the number of experts E=8"),
    (dict(top_k=2, n_group=0), r"n_group must be in \[1, 8\], got 0"),
    (dict(top_k=2, n_group=4, topk_group=5), r"topk_group must be in \[1, 4\], got 5"),
    (dict(top_k=5, n_group=4, topk_group=2), "cannot supply top_k=5"),
    (dict(top_k=2, selection_bias=np.zeros(7, np.float32)),
     r"selection_bias must have shape \(8,\)"),
    (dict(top_k=2, selection_bias=np.zeros(8, np.int32)), "selection_bias must be a float array"),
])
def test_route_rejects_bad_options(kwargs, match):
    with pytest.raises(MoEError, match=match):
        nm.route(_LOGITS, **kwargs)


@pytest.mark.parametrize("logits,match", [
    (_LOGITS.astype(np.int32), "logits must be float32 .or float64, converted., got int32"),
    (_LOGITS[0], r"logits must be 2-D \(T, E\)"),
    (np.zeros((3, 0), np.float32), "at least one expert column, got E=0"),
])
def test_route_rejects_bad_logits(logits, match):
    with pytest.raises(MoEError, match=match):
        nm.route(logits, 1)


def test_route_into_rejects_bad_buffers():
    ids = np.empty((5, 2), np.int32)
    w = np.empty((5, 2), np.float32)
    scratch = np.empty((5, 2 * E + 1), np.float32)
    with pytest.raises(MoEError, match="out_ids must be a int32 array, got int64"):
        nm.route_into(_LOGITS, ids.astype(np.int64), w, scratch, 2)
    with pytest.raises(MoEError, match=r"out_weights must have shape \(5, 2\)"):
        nm.route_into(_LOGITS, ids, w[:4], scratch, 2)
    with pytest.raises(MoEError, match="scratch must have shape at least"):
        nm.route_into(_LOGITS, ids, w, np.empty((5, E), np.float32), 2)
    with pytest.raises(MoEError, match="scratch must be a C-contiguous float32 2-D array"):
        nm.route_into(_LOGITS, ids, w, np.empty((5, 4 * E), np.float32)[:, ::2], 2)
    with pytest.raises(MoEError, match="logits must be C-contiguous float32"):
        nm.route_into(_LOGITS.astype(np.float64), ids, w, scratch, 2)


_IDS = np.array([[0, 3], [7, 1]], dtype=np.int32)
_W = np.full((2, 2), 0.5, np.float32)


@pytest.mark.parametrize("ids,match", [
    (np.array([[0, 8], [1, 2]]), r"expert_ids\[0, 1\] = 8 is outside \[0, 8\)"),
    (np.array([[0, 1], [-1, 2]]), r"expert_ids\[1, 0\] = -1 is outside \[0, 8\)"),
    (np.array([[0, 1], [2**32, 2]], dtype=np.int64), r"expert_ids\[1, 0\] = 4294967296"),
    (np.array([[0.0, 1.0], [2.0, 3.0]]), "expert_ids must be an integer array"),
    (np.zeros((2, 0), np.int32), "at least one column"),
])
def test_plan_rejects_bad_ids(ids, match):
    with pytest.raises(MoEError, match=match):
        nm.BucketPlan.build(ids, np.ones(ids.shape, np.float32), E)
    if ids.shape[1]:
        with pytest.raises(MoEError, match=match):
            nm.moe_align_block_size(ids, E, 16)


def test_plan_rejects_bad_sizes():
    with pytest.raises(MoEError, match="num_experts must be an integer >= 1, got 0"):
        nm.BucketPlan.build(_IDS, _W, 0)
    with pytest.raises(MoEError, match="expert_weights must have the shape of expert_ids"):
        nm.BucketPlan.build(_IDS, _W[:1], E)
    plan = nm.BucketPlan.empty(2, 2, E)
    with pytest.raises(MoEError, match="more than this plan's max_tokens=2"):
        plan.rebuild(np.zeros((3, 2), np.int32), np.ones((3, 2), np.float32))
    with pytest.raises(MoEError, match="must have top_k=2 columns"):
        plan.rebuild(np.zeros((2, 3), np.int32), np.ones((2, 3), np.float32))


@pytest.mark.parametrize("block_size", [0, 1, 7, 12, 24, 128, -16, True, 16.0, "16", None])
def test_block_size_must_be_supported(block_size):
    with pytest.raises(MoEError, match=r"block_size must be one of \(8, 16, 32, 48, 64\)"):
        nm.moe_align_block_size(_IDS, E, block_size)
    with pytest.raises(MoEError, match="block_size must be one of"):
        nm.BucketPlan.build(_IDS, _W, E).align(block_size)


@pytest.mark.parametrize("block_size", [8, 16, 32, 48, 64])
def test_every_supported_block_size_works(block_size):
    a = nm.moe_align_block_size(_IDS, E, block_size)
    assert a.num_tokens_post_padded % block_size == 0
    assert a.sorted_token_ids.max() <= _IDS.size


@pytest.mark.parametrize("raw", ["7", "0", "128", "sixteen", "-16"])
def test_block_size_env_is_ignored_with_a_warning(raw):
    with pytest.warns(RuntimeWarning, match=f"ignoring NUMBA_MOE_BLOCK_SIZE='{raw}'"):
        assert parse_env({"NUMBA_MOE_BLOCK_SIZE": raw}).block_size is None


def test_pick_block_size_rejects():
    with pytest.raises(MoEError, match="total_pairs must be an integer >= 0"):
        nm.pick_block_size(np.array([1, 1]), -2)
    with pytest.raises(MoEError, match="must be non-negative counts"):
        nm.pick_block_size(np.array([3, -1]), 2)
    with pytest.raises(MoEError, match="1-D integer array"):
        nm.pick_block_size(np.array([1.0, 1.0]), 2)


def test_expert_tensor_checks_ids(layer):
    layer.gate.check_expert_ids(np.array([0, 7]))
    with pytest.raises(MoEError,
                       match=r"expert id 8 out of range \[0, 8\) for blk.0.ffn_gate_exps"):
        layer.gate.check_expert_ids(np.array([0, 8]))
    with pytest.raises(MoEError, match="expert id -3 out of range"):
        layer.down.check_expert_ids(np.array([[-3]]))


def test_loader_rejects_bad_arguments(qwen):
    with pytest.raises(GGUFError, match="layer -1 out of range: qwen3moe.block_count = 1"):
        nm.load_moe_layer(qwen, layer=-1)
    with pytest.raises(MoEError, match="layer=True: expected an integer block index"):
        nm.load_moe_layer(qwen, layer=True)
    with pytest.raises(MoEError, match="gating='relu': expected one of"):
        nm.load_moe_layer(qwen, gating="relu")
    with pytest.raises(GGUFError, match="is a directory|no such file"):
        nm.load_moe_layer(os.path.dirname(qwen))


@pytest.mark.parametrize("call,match", [
    (lambda: nm.quants.dequantize(np.zeros((2, 144), np.float32), "Q4_K"), "dtype uint8"),
    (lambda: nm.quants.dequantize(np.zeros((2, 100), np.uint8), "Q4_K"),
     "100 bytes, not a multiple of the Q4_K block size of 144"),
    (lambda: nm.quants.dequantize(np.zeros(144, np.uint8), "Q9_K"),
     "unknown GGML quantization type name 'Q9_K'"),
    (lambda: nm.quants.dequantize(np.zeros(4, np.uint8), "I32"), "I32 cannot be dequantized"),
    (lambda: nm.quants.quantize(np.zeros((2, 100), np.float32), "Q4_K"), "100"),
])
def test_quants_reject(call, match):
    with pytest.raises(MoEError, match=match):
        call()


def _plan_for(layer, x):
    r = layer.route(x)
    return nm.BucketPlan.build(r.expert_ids, r.expert_weights, layer.num_experts)


def test_cpu_kernel_wrappers_reject(layer):
    x = _x(4)
    plan = _plan_for(layer, x)
    off, tok = plan.expert_offsets, plan.packed_token_idx
    with pytest.raises(MoEError,
                       match=r"expert_offsets: expected a C-contiguous int64 array \[9\]"):
        grouped_gate_up(layer.gate, layer.up, x, off[:-1], tok)
    bad = off.copy()
    bad[3], bad[4] = bad[4] + 1, bad[3]
    with pytest.raises(MoEError, match="expert_offsets: expected non-decreasing"):
        grouped_gate_up(layer.gate, layer.up, x, bad, tok)
    with pytest.raises(MoEError, match=r"packed_token_idx: token index out of range \[0, 4\)"):
        grouped_gate_up(layer.gate, layer.up, x, off, tok + 4)
    with pytest.raises(MoEError, match="packed_token_idx: expected a C-contiguous int32"):
        grouped_gate_up(layer.gate, layer.up, x, off, tok.astype(np.int64))
    with pytest.raises(MoEError, match=r"x: expected a C-contiguous float32 array \[n, 256\]"):
        grouped_gate_up(layer.gate, layer.up, x[:, :128].copy(), off, tok)
    with pytest.raises(MoEError, match="gate: expected an ExpertTensor"):
        grouped_gate_up(np.zeros(3), layer.up, x, off, tok)
    with pytest.raises(MoEError, match="h: expected at least 8 rows"):
        grouped_down(layer.down, np.zeros((3, I), np.float32), off)
    with pytest.raises(MoEError, match=r"out: expected a C-contiguous float32 array \[>= 8, 256\]"):
        grouped_down(layer.down, np.zeros((8, I), np.float32), off,
                     out=np.zeros((7, H), np.float32))
    with pytest.raises(MoEError, match="row length 100 is not a multiple of 32"):
        quantize_rows(np.zeros((2, 100), np.float32))
    with pytest.raises(MoEError, match=r"n=3: expected 0 <= n <= 2"):
        quantize_rows(np.zeros((2, 64), np.float32), n=3)
    y = np.zeros((8, H), np.float32)
    with pytest.raises(MoEError, match="pairs_by_token: slot index out of range of y"):
        combine(y, plan.pairs_by_token + 8, plan.pair_weights, K, np.zeros((4, H), np.float32))
    with pytest.raises(MoEError, match=r"pairs_by_token / pair_weights: expected shape \(8,\)"):
        combine(y, plan.pairs_by_token[:6], plan.pair_weights, K, np.zeros((4, H), np.float32))


def test_combine_rejects_bad_dtypes(layer):
    y = np.zeros((8, H), np.float32)
    w = np.full(8, 0.5, np.float32)
    out = np.zeros((4, H), np.float32)
    with pytest.raises(MoEError, match="pairs_by_token"):
        combine(y, np.zeros(8, np.float64), w, K, out)
    with pytest.raises(MoEError, match="out"):
        combine(y, np.zeros(8, np.int32), w, K, np.zeros(H, np.float32))
    with pytest.raises(MoEError, match="pairs_by_token"):
        combine(y, list(range(8)), w, K, out)


def test_combine_top_k_zero_does_not_crash():
    r = _isolated("""
        import numpy as np
        from numba_moe.cpu import combine
        from numba_moe.errors import MoEError
        try:
            combine(np.ones((6, 64), np.float32), np.zeros(0, np.int32),
                    np.zeros(0, np.float32), 0, np.zeros((3, 64), np.float32))
        except MoEError as exc:
            print("MoEError:", exc)
    """)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-500:]}"
    assert "MoEError" in r.stdout and "top_k" in r.stdout


def test_gemm_rejects_bad_num_threads(layer):
    x = _x(2)
    plan = _plan_for(layer, x)
    with pytest.raises(MoEError, match="num_threads"):
        grouped_gate_up(layer.gate, layer.up, x, plan.expert_offsets, plan.packed_token_idx,
                        num_threads=-1)


# --------------------------------------------------------------------------
# 1b. metadata and tensor sanity (files the writer would not produce)
# --------------------------------------------------------------------------

def _header_map(path):
    """{key: (offset, dtype) of its value} and {tensor: {part: offset}} of a file."""
    r = gguf.GGUFReader(path)
    base = r.data.ctypes.data
    keys = {name: (int(f.parts[-1].ctypes.data - base), f.parts[-1].dtype)
            for name, f in r.fields.items()}
    tensors = {}
    for t in r.tensors:
        names = ("name_len", "name", "n_dims", "dims", "type", "offset")
        tensors[t.name] = {n: int(p.ctypes.data - base) for n, p in zip(names, t.field.parts)}
        tensors[t.name]["shape"] = t.shape.tolist()
    return keys, tensors


def _patched(src, dst, edits):
    """Copy ``src`` to ``dst`` with ``edits`` = [(offset, struct format, value), ...]."""
    b = bytearray(open(src, "rb").read())
    for off, fmt, value in edits:
        struct.pack_into("<" + fmt, b, off, value)
    with open(dst, "wb") as fh:
        fh.write(b)
    return str(dst)


def _set_key(src, dst, key, value):
    keys, _ = _header_map(src)
    off, dtype = keys[key]
    fmt = {"u4": "I", "i4": "i", "f4": "f", "u1": "B", "b1": "?"}[dtype.str[1:]]
    return _patched(src, dst, [(off, fmt, value)])


@pytest.mark.parametrize("key,value,match", [
    ("qwen3moe.expert_used_count", 0, "'qwen3moe.expert_used_count' = 0, expected >= 1"),
    ("qwen3moe.expert_used_count", 9, "expert_used_count = 9 exceeds qwen3moe.expert_count = 8"),
    ("qwen3moe.expert_count", 0, "'qwen3moe.expert_count' = 0, expected >= 1"),
    ("qwen3moe.embedding_length", 0, "'qwen3moe.embedding_length' = 0, expected >= 1"),
    ("qwen3moe.expert_feed_forward_length", 0, "expert_feed_forward_length' = 0"),
    ("qwen3moe.expert_feed_forward_length", 128,
     r"ffn_gate_exps.weight' has shape \[8, 256, 256\], the metadata implies \[8, 128, 256\]"),
    ("qwen3moe.block_count", 0, "'qwen3moe.block_count' = 0, expected >= 1"),
])
def test_bad_metadata_values(qwen, tmp_path, key, value, match):
    with pytest.raises(GGUFError, match=match):
        nm.load_moe_layer(_set_key(qwen, tmp_path / "m.gguf", key, value))


@pytest.mark.parametrize("key,value,match", [
    ("deepseek2.expert_group_count", 3,
     "expert_group_count = 3 does not divide deepseek2.expert_count = 8"),
    ("deepseek2.expert_group_used_count", 5, "expert_group_used_count = 5 is invalid"),
    ("deepseek2.expert_group_count", 0, "'deepseek2.expert_group_count' = 0, expected >= 1"),
    ("deepseek2.expert_gating_func", 3, "expert_gating_func = 3: expected 1 .softmax. or 2"),
    ("deepseek2.expert_weights_scale", float("nan"), "weights_scale' = nan, expected a finite"),
    ("deepseek2.expert_weights_scale", float("inf"), "weights_scale' = inf, expected a finite"),
    ("deepseek2.expert_shared_count", 1,
     r"ffn_gate_shexp.weight' has shape \[512, 256\], the metadata implies \[256, 256\]"),
    ("deepseek2.leading_dense_block_count", 1, "layer 0 is a dense FFN layer"),
])
def test_bad_deepseek2_metadata(ds2, tmp_path, key, value, match):
    with pytest.raises(GGUFError, match=match):
        nm.load_moe_layer(_set_key(ds2, tmp_path / "m.gguf", key, value))


def _rewrite(src, dst, *, key_types=None, tensor_map=None):
    """Copy a GGUF file through gguf-py, changing key value types or tensors.

    ``key_types``: {key: (value, GGUFValueType)}, replaced or added; ``tensor_map(name, array,
    qtype)`` returns ``[(name, array, qtype), ...]`` to write instead.
    """
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value, vtype = (key_types or {}).get(name, (field.contents(), field.types[0]))
        w.add_key_value(name, value, vtype)
    for name, (value, vtype) in (key_types or {}).items():
        if name not in r.fields:
            w.add_key_value(name, value, vtype)
    for t in r.tensors:
        items = [(t.name, np.array(t.data), t.tensor_type)]
        if tensor_map is not None:
            items = tensor_map(t.name, items[0][1], t.tensor_type)
        for name, arr, qt in items:
            w.add_tensor(name, arr, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(dst)


def test_metadata_of_the_wrong_type(qwen, tmp_path):
    V = gguf.GGUFValueType
    dst = _rewrite(qwen, tmp_path / "a.gguf",
                   key_types={"qwen3moe.embedding_length": ("256", V.STRING)})
    with pytest.raises(GGUFError,
                       match="'qwen3moe.embedding_length' should be an integer, got '256'"):
        nm.load_moe_layer(dst)
    dst = _rewrite(qwen, tmp_path / "b.gguf",
                   key_types={"qwen3moe.expert_used_count": (True, V.BOOL)})
    with pytest.raises(GGUFError,
                       match="'qwen3moe.expert_used_count' should be an integer, got True"):
        nm.load_moe_layer(dst)
    dst = _rewrite(qwen, tmp_path / "c.gguf",
                   key_types={"qwen3moe.expert_count": (8.5, V.FLOAT32)})
    with pytest.raises(GGUFError, match="'qwen3moe.expert_count' should be an integer, got 8.5"):
        nm.load_moe_layer(dst)


def test_tensor_of_an_undecodable_type(qwen, tmp_path):
    def as_i32(name, arr, qt):
        if name == "blk.0.ffn_gate_inp.weight":
            return [(name, arr.view(np.int32), Q.I32)]
        return [(name, arr, qt)]

    with pytest.raises(GGUFError, match="'blk.0.ffn_gate_inp.weight' has type I32, which neither"):
        nm.load_moe_layer(_rewrite(qwen, tmp_path / "a.gguf", tensor_map=as_i32))


def test_missing_or_renamed_shared_expert(ds2, tmp_path):
    def drop(name, arr, qt):
        return [] if "up_shexp" in name else [(name, arr, qt)]

    with pytest.raises(GGUFError, match="missing tensor 'blk.0.ffn_up_shexp.weight'"):
        nm.load_moe_layer(_rewrite(ds2, tmp_path / "a.gguf", tensor_map=drop))

    def rename(name, arr, qt):
        return [(name.replace("gate_shexp", "gate_shexq"), arr, qt)]

    with pytest.raises(GGUFError, match="missing tensor 'blk.0.ffn_gate_shexp.weight'"):
        nm.load_moe_layer(_rewrite(ds2, tmp_path / "b.gguf", tensor_map=rename))


def test_row_length_not_a_multiple_of_the_block(qwen, tmp_path):
    # Rewrite gate_exps' dims from (256, 256, 8) to (128, 512, 8): same bytes,
    # but a Q4_K row of 128 values is not whole blocks.
    _, tensors = _header_map(qwen)
    d = tensors["blk.0.ffn_gate_exps.weight"]["dims"]
    dst = _patched(qwen, tmp_path / "a.gguf", [(d, "Q", 128), (d + 8, "Q", 512)])
    with pytest.raises(GGUFError, match="'blk.0.ffn_gate_exps.weight' .Q4_K. row length 128 is "
                                        "not a multiple of the block size 256"):
        nm.load_moe_layer(dst)


def test_tensor_bytes_must_match_shape_and_type(qwen, tmp_path):
    _, tensors = _header_map(qwen)
    t = tensors["blk.0.ffn_down_exps.weight"]
    # 9 experts declared where the file holds 8: past the end of the file
    dst = _patched(qwen, tmp_path / "a.gguf", [(t["dims"] + 16, "Q", 9)])
    with pytest.raises(GGUFError,
                       match=r"'blk.0.ffn_down_exps.weight' needs \d+ bytes .* past the end"):
        nm.load_moe_layer(dst)
    # Q4_K -> Q5_K: more bytes, so the next tensor would not start where stored
    g = tensors["blk.0.ffn_gate_exps.weight"]
    dst = _patched(qwen, tmp_path / "b.gguf", [(g["type"], "I", int(Q.Q5_K))])
    with pytest.raises(GGUFError, match="'blk.0.ffn_up_exps.weight' has data offset"):
        nm.load_moe_layer(dst)
    # shape that disagrees with the metadata
    dst = _patched(qwen, tmp_path / "c.gguf", [(g["dims"] + 16, "Q", 4),
                                               (g["dims"] + 8, "Q", 512)])
    with pytest.raises(GGUFError, match=r"ffn_gate_exps.weight' has shape \[4, 512, 256\], the "
                                        r"metadata implies \[8, 256, 256\]"):
        nm.load_moe_layer(dst)


# --------------------------------------------------------------------------
# 2. corrupt headers, crafted (the fuzz test mutates at random)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("what,edit,match", [
    ("kv count", lambda k, t: [(16, "Q", 2**40)], "more than the file can hold"),
    ("tensor count", lambda k, t: [(8, "Q", 2**63)], "more than the file can hold"),
    ("version", lambda k, t: [(4, "I", 1)], "GGUF version 1"),
    ("magic", lambda k, t: [(0, "I", 0x46554747 ^ 1)], "bad magic"),
    ("key name length", lambda k, t: [(24, "Q", 2**62)], "name of metadata key #0 .* runs past"),
    ("string value length", lambda k, t: [(k["general.architecture"][0] - 8, "Q", 2**50)],
     "metadata key 'general.architecture' .* runs past the end"),
    ("value type", lambda k, t: [(k["qwen3moe.block_count"][0] - 4, "I", 13)],
     "metadata key 'qwen3moe.block_count': unknown value type 13"),
    # the hang gguf-py has: an array of bytes longer than the file
    ("array length", lambda k, t: [(k["qwen3moe.block_count"][0] - 4, "I", 9),
                                   (k["qwen3moe.block_count"][0], "I", 0),
                                   (k["qwen3moe.block_count"][0] + 4, "Q", 2**40)],
     "metadata key 'qwen3moe.block_count': array of 1099511627776 items"),
    ("array of strings", lambda k, t: [(k["qwen3moe.block_count"][0] - 4, "I", 9),
                                       (k["qwen3moe.block_count"][0], "I", 8),
                                       (k["qwen3moe.block_count"][0] + 4, "Q", 2**40)],
     "array of 1099511627776 items cannot fit"),
    ("tensor name length", lambda k, t: [(t["blk.0.ffn_up_exps.weight"]["name_len"], "Q", 2**60)],
     "name of tensor #2 .* runs past"),
    ("n_dims", lambda k, t: [(t["blk.0.ffn_up_exps.weight"]["n_dims"], "I", 5)],
     "tensor 'blk.0.ffn_up_exps.weight' has 5 dimensions, expected 1 to 4"),
    ("n_dims 0", lambda k, t: [(t["blk.0.ffn_up_exps.weight"]["n_dims"], "I", 0)],
     "has 0 dimensions"),
    ("huge dim", lambda k, t: [(t["blk.0.ffn_up_exps.weight"]["dims"] + 8, "Q", 2**62)],
     "'blk.0.ffn_up_exps.weight' needs .* bytes .* past the end of the file"),
    ("tensor type", lambda k, t: [(t["blk.0.ffn_up_exps.weight"]["type"], "I", 99)],
     "tensor 'blk.0.ffn_up_exps.weight' has unknown ggml type 99"),
    ("tensor offset", lambda k, t: [(t["blk.0.ffn_up_exps.weight"]["offset"], "Q", 0)],
     "'blk.0.ffn_up_exps.weight' has data offset 0, expected"),
    ("tensor offset past end", lambda k, t: [(t["blk.0.ffn_down_exps.weight"]["offset"], "Q",
                                             2**63)], "has data offset 9223372036854775808"),
    ("key name utf-8", lambda k, t: [(32, "B", 0xFF)], "name of metadata key #0 is not UTF-8"),
])
def test_corrupt_header_fields(qwen, tmp_path, what, edit, match):
    keys, tensors = _header_map(qwen)
    dst = _patched(qwen, tmp_path / "c.gguf", edit(keys, tensors))
    with pytest.raises(GGUFError, match=match) as info:
        nm.load_moe_layer(dst)
    assert str(dst) in str(info.value)


@pytest.mark.parametrize("keep", ["empty", 10, 23, 24, 100, "header", "data", "last"])
def test_truncated_anywhere(qwen, tmp_path, keep):
    data = open(qwen, "rb").read()
    header = gguf.GGUFReader(qwen).data_offset
    n = {"empty": 0, "header": header - 1, "data": header + 10,
         "last": len(data) - 1}.get(keep, keep)
    dst = tmp_path / "t.gguf"
    dst.write_bytes(data[:n])
    with pytest.raises(GGUFError, match="truncated"):
        nm.load_moe_layer(dst)


@pytest.mark.parametrize("old,new,match", [
    ("blk.0.ffn_down_exps.weight", "blk.0.ffn_gate_exps.weight", "duplicated tensor"),
    ("general.architecture", "qwen3moe.block_count", "Duplicate qwen3moe.block_count"),
    ("blk.0.ffn_up_exps.weight", "blk.0.ffn_up_exps.weigh_", "missing tensor 'blk.0.ffn_up_exps"),
])
def test_duplicate_or_renamed_names(qwen, tmp_path, old, new, match):
    """Same-length renames in place: a duplicate name, or a tensor that vanishes."""
    b = open(qwen, "rb").read()
    old, new = old.encode(), new.encode()
    assert len(old) == len(new) and b.count(old) == 1
    dst = tmp_path / "d.gguf"
    dst.write_bytes(b.replace(old, new))
    with pytest.raises(GGUFError, match=match):
        nm.load_moe_layer(dst)


def test_unreadable_file(qwen, monkeypatch):
    import numba_moe.gguf_io as gguf_io

    class _NoMap:
        ACCESS_READ = 1

        @staticmethod
        def mmap(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(gguf_io, "mmap", _NoMap)
    with pytest.raises(GGUFError, match="cannot read the file: .*Permission denied"):
        nm.load_moe_layer(qwen)


def test_big_endian_file_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "be.gguf"), "qwen3moe", endianess=gguf.GGUFEndian.BIG)
    w.add_block_count(1)
    w.add_tensor("blk.0.ffn_gate_inp.weight", np.ones((8, 256), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(GGUFError, match="other byte order"):
        nm.load_moe_layer(tmp_path / "be.gguf")


def _realigned(src, dst, alignment, pad):
    """``src`` rewritten with ``general.alignment`` and a ``pad``-byte key before the data."""
    f = GGUFFile(src)
    w = gguf.GGUFWriter(str(dst), "qwen3moe")
    w.add_custom_alignment(alignment)
    w.add_string("pad", "x" * pad)
    copy_metadata(f, w)
    for t in f.reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return str(dst)


@pytest.mark.parametrize("alignment", [1, 8])
def test_unaligned_tensors_load_and_run(make_model, tmp_path, alignment):
    """``general.alignment = 1`` can put F32 tensors at odd addresses: the views are
    unaligned, the kernels still read them right."""
    src = make_model("f32_experts", arch="qwen3moe", gate_type="F32", up_type="F16",
                     down_type="F32")
    ref = nm.load_moe_layer(src)
    x = _x(3)
    for pad in range(4):
        lay = nm.load_moe_layer(_realigned(src, tmp_path / f"u{pad}.gguf", alignment, pad))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            np.testing.assert_array_equal(lay(x), ref(x))
        if not lay.gate.data.flags.aligned:
            break
    assert alignment > 1 or not lay.gate.data.flags.aligned


def test_bad_alignment_value(qwen, tmp_path):
    dst = _rewrite(qwen, tmp_path / "a.gguf",
                   key_types={"general.alignment": (3, gguf.GGUFValueType.UINT32)})
    with pytest.raises(GGUFError, match="general.alignment = 3, expected a power of two"):
        nm.load_moe_layer(dst)


# --------------------------------------------------------------------------
# 3. NaN / Inf: propagate, never index out of range
# --------------------------------------------------------------------------

@pytest.mark.parametrize("gating,n_group,bias", [("softmax", 1, False), ("sigmoid", 4, True),
                                                 ("softmax_weight", 1, False),
                                                 ("softmax", 2, True)])
def test_route_non_finite_logits_keeps_ids_in_range(gating, n_group, bias):
    rng = np.random.default_rng(11)
    T, n, k = 400, 16, 4
    logits = rng.standard_normal((T, n)).astype(np.float32)
    mask = rng.random((T, n))
    logits[mask < 0.15] = np.nan
    logits[(mask >= 0.15) & (mask < 0.2)] = np.inf
    logits[(mask >= 0.2) & (mask < 0.25)] = -np.inf
    logits[::7] = np.nan                      # whole rows of NaN
    logits[1::7] = -np.inf                    # whole rows of -inf
    sb = rng.standard_normal(n).astype(np.float32) if bias else None
    if bias:
        sb[3] = np.nan
    for kk in (1, k, n):
        tg = n_group if kk == n else max(1, n_group // 2)
        r = nm.route(logits, kk, gating=gating, n_group=n_group, topk_group=tg,
                     selection_bias=sb)
        ids = r.expert_ids
        assert ids.min() >= 0 and ids.max() < n
        srt = np.sort(ids, axis=1)
        assert (np.diff(srt, axis=1) > 0).all(), "an expert chosen twice"
    # documented: any NaN logit makes the whole softmax row's weights NaN
    r = nm.route(logits, k, gating="softmax")
    nan_rows = np.isnan(logits).any(axis=1)
    assert np.isnan(r.expert_weights[nan_rows]).all()
    np.testing.assert_array_equal(r.expert_ids[::7], np.tile(np.arange(k), (len(logits[::7]), 1)))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_non_finite_tokens_poison_only_their_rows(layer, path):
    x = _x(6, seed=4)
    with override(path=path):
        clean = layer(x)
        bad = x.copy()
        bad[1, 5] = np.nan
        bad[3, 0] = np.inf
        bad[4, :] = -np.inf
        y = layer(bad)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.isnan(y[[1, 3, 4]]).all()
    np.testing.assert_array_equal(y[[0, 2, 5]], clean[[0, 2, 5]])


@pytest.mark.parametrize("scale", [0x7C00, 0x7E00, 0xFC00])   # +inf, NaN, -inf fp16
def test_non_finite_weight_block_poisons_only_its_expert(qwen, layer, tmp_path, scale):
    """A corrupt fp16 scale in expert 3's gate: exactly the tokens routed to 3 go non-finite."""
    t = [t for t in gguf.GGUFReader(qwen).tensors if t.name == "blk.0.ffn_gate_exps.weight"][0]
    expert_bytes = t.n_bytes // E
    # block 0 of row 17 of expert 3: its d (fp16 @0)
    off = t.data_offset + 3 * expert_bytes + 17 * (H // 256) * 144
    bad = nm.load_moe_layer(_patched(qwen, tmp_path / "w.gguf", [(off, "H", scale)]))
    x = _x(64, seed=5)
    ids = layer.route(x).expert_ids
    hit = (ids == 3).any(axis=1)
    assert hit.any() and not hit.all()
    y = bad(x)
    assert not np.isfinite(y[hit]).any()
    np.testing.assert_array_equal(y[~hit], layer(x)[~hit])


# --------------------------------------------------------------------------
# 5. large shapes: limits are checked, offsets past 2**31 are int64
# --------------------------------------------------------------------------

def test_pair_count_limit_is_checked_before_allocating():
    with pytest.raises(MoEError, match="max_tokens \\* top_k = 2147483648 exceeds 2147483647"):
        nm.BucketPlan.empty(2**30, 2, 8)
    huge = np.broadcast_to(np.zeros(1, np.int32), (2**30, 2))       # no memory behind it
    with pytest.raises(MoEError, match="expert_ids holds 2147483648 pairs, more than"):
        nm.BucketPlan.build(huge, np.broadcast_to(np.float32(1), huge.shape), 8)
    with pytest.raises(MoEError, match="expert_ids holds 2147483648 pairs"):
        nm.moe_align_block_size(huge, 8, 64)


def test_combine_reads_rows_past_2_31_elements(tmp_path):
    """Slot rows whose element offset exceeds 2**31 (8 GiB of float32, a sparse file)."""
    hidden = 64
    slots = 2**31 // hidden + 64
    path = tmp_path / "y.bin"
    y = np.memmap(path, dtype=np.float32, mode="w+", shape=(slots, hidden))
    if os.stat(path).st_blocks * 512 > 2**26:
        pytest.skip("the temporary file system has no sparse files")
    rng = np.random.default_rng(6)
    pbt = np.array([slots - 1, 5, 2**31 // hidden + 3, slots - 2], dtype=np.int32)
    assert (pbt.astype(np.int64) * hidden > 2**31).sum() == 3
    rows = rng.standard_normal((4, hidden)).astype(np.float32)
    y[pbt] = rows
    w = np.array([0.25, 0.75, 0.5, 0.5], np.float32)
    out = np.full((2, hidden), np.nan, np.float32)
    combine(y, pbt, w, 2, out)
    want = np.stack([w[0] * rows[0] + w[1] * rows[1], w[2] * rows[2] + w[3] * rows[3]])
    np.testing.assert_allclose(out, want, rtol=1e-6)
    del y


def test_cuda_more_tokens_than_grid_y(layer):
    """Large T on the GPU: more tokens than a grid's y dimension holds (65535)."""
    backend = pytest.importorskip("cuda_backend")
    if backend.SIMULATOR or not backend.usable:
        pytest.skip("needs a real GPU")
    from numba_moe.reference import moe_forward_float64

    x = _x(65536, seed=9)
    y = layer(x, device="cuda")
    pick = np.r_[0:2, 65534:65536]
    # against float64 (the CPU path quantizes activations: ~1e-3 apart)
    ref = moe_forward_float64(layer, x[pick])
    assert np.linalg.norm(y[pick] - ref) / np.linalg.norm(ref) < 1e-4

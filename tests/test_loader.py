"""Loader and writer: every architecture, zero-copy views, error messages."""

import gguf
import numpy as np
import pytest

import numba_moe as nm
from numba_moe.errors import GGUFError, MoEError
from numba_moe.gguf_io import GGUFFile, copy_metadata

Q = gguf.GGMLQuantizationType

ARCH_EXPECT = {
    # arch: (norm_topk_prob, gating, has shared, shared gated)
    "qwen3moe": (True, "softmax", False, False),
    "qwen2moe": (False, "softmax", True, True),
    "olmoe": (False, "softmax", False, False),
    "llama": (True, "softmax", False, False),
}


@pytest.mark.parametrize("arch", sorted(ARCH_EXPECT))
def test_arch_defaults(make_model, arch):
    norm, gating, shared, gated = ARCH_EXPECT[arch]
    layer = nm.load_moe_layer(make_model(arch, arch=arch), layer=0)
    assert layer.arch == arch
    assert (layer.num_experts, layer.top_k, layer.hidden_size, layer.expert_intermediate) == \
        (8, 2, 256, 256)
    assert layer.norm_topk_prob is norm and layer.gating == gating
    assert (layer.shared is not None) is shared
    if shared:
        assert (layer.shared.gate_inp is not None) is gated
    assert layer.router.dtype == np.float32 and layer.router.shape == (8, 256)
    assert "E=8" in repr(layer)


@pytest.mark.parametrize("gating,code", [("softmax", 1), ("sigmoid", 2)])
def test_deepseek2_routing_settings(make_model, gating, code):
    path = make_model(f"ds2_{gating}", arch="deepseek2", num_layers=2, leading_dense=1,
                      num_experts=8, top_k=2, n_group=4, topk_group=2, weights_scale=2.5,
                      norm_topk_prob=True, gating_func=gating, shared_intermediate=512)
    layer = nm.load_moe_layer(path, layer=1)
    assert layer.gating == gating
    assert layer.norm_topk_prob is True
    assert layer.routed_scale == 2.5
    assert (layer.n_group, layer.topk_group) == (4, 2)
    assert (layer.selection_bias is not None) is (gating == "sigmoid")
    assert layer.shared is not None and layer.shared.gate_inp is None
    assert layer.shared.gate.shape == (1, 512, 256)
    with pytest.raises(GGUFError, match="dense FFN layer"):
        nm.load_moe_layer(path, layer=0)


def test_expert_tensors_are_views_of_the_map(make_model):
    layer = nm.load_moe_layer(make_model("qwen3moe", arch="qwen3moe"), layer=0)
    mapped = layer._file.reader.data
    for t in layer.expert_tensors:
        assert t.native
        assert not t.data.flags.owndata
        assert np.shares_memory(t.data, mapped), t.name


def test_mixed_types_and_fused_gate_up(make_model):
    path = make_model("mixed", arch="qwen3moe", gate_type="Q5_K", up_type="Q8_0",
                      down_type="Q4_K")
    layer = nm.load_moe_layer(path)
    assert [t.qtype for t in (layer.gate, layer.up, layer.down)] == [Q.Q5_K, Q.Q8_0, Q.Q4_K]
    fused = nm.load_moe_layer(make_model("fused", arch="qwen3moe", fused_gate_up=True))
    assert fused.gate_up_fused is not None
    assert fused.gate.shape == fused.up.shape == (8, 256, 256)
    mapped = fused._file.reader.data
    assert np.shares_memory(fused.gate.data, mapped) and np.shares_memory(fused.up.data, mapped)
    # The halves are the two row ranges of the one tensor.
    whole = nm.quants.dequantize(fused.gate_up_fused.data, Q.Q4_K)
    np.testing.assert_array_equal(fused.gate.dense(), whole[:, :256])
    np.testing.assert_array_equal(fused.up.dense(), whole[:, 256:])


def test_fallback_type_loads_and_warns_on_dense(make_model):
    layer = nm.load_moe_layer(make_model("q4_0", arch="olmoe", gate_type="Q4_0",
                                         up_type="F16", down_type="F32"))
    assert not layer.gate.native and not layer.up.native
    with pytest.warns(RuntimeWarning, match="slow path"):
        dense = layer.gate.dense()
    assert dense.shape == (8, 256, 256) and dense.dtype == np.float32
    np.testing.assert_array_equal(layer.down.dense(), layer.down.data)
    assert np.shares_memory(layer.down.data, layer._file.reader.data)


def test_unknown_arch_needs_explicit_norm(make_model):
    path = make_model("mystery", arch="mysterymoe")
    with pytest.raises(MoEError, match="norm_topk_prob"):
        nm.load_moe_layer(path)
    with pytest.warns(RuntimeWarning, match="unknown architecture 'mysterymoe'"):
        layer = nm.load_moe_layer(path, norm_topk_prob=False)
    assert layer.norm_topk_prob is False and layer.gating == "softmax"


# -- errors -------------------------------------------------------------------


def _rewrite(src, dst, *, drop_tensor=None, drop_key=None, key_value=None, shape_of=None):
    """Copy a GGUF file, dropping a tensor or key, changing a key's value, or
    dropping the last expert row of tensor ``shape_of``."""
    f = GGUFFile(src)
    w = gguf.GGUFWriter(dst, f.arch)
    copy_metadata(f, w, replace=dict([key_value]) if key_value else None,
                  skip=(drop_key,) if drop_key else ())
    for t in f.reader.tensors:
        if t.name == drop_tensor:
            continue
        data = t.data[:-1] if t.name == shape_of else t.data
        w.add_tensor(t.name, np.array(data), raw_dtype=t.tensor_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return dst


def test_error_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        nm.load_moe_layer(tmp_path / "nope.gguf")


def test_error_layer_out_of_range(make_model):
    with pytest.raises(GGUFError, match="layer 5 out of range"):
        nm.load_moe_layer(make_model("qwen3moe", arch="qwen3moe"), layer=5)
    with pytest.raises(MoEError, match="layer="):
        nm.load_moe_layer(make_model("qwen3moe", arch="qwen3moe"), layer="0")


def test_error_missing_tensor(make_model, tmp_path):
    dst = _rewrite(make_model("qwen3moe", arch="qwen3moe"), tmp_path / "m.gguf",
                   drop_tensor="blk.0.ffn_down_exps.weight")
    with pytest.raises(GGUFError, match="missing tensor 'blk.0.ffn_down_exps.weight'"):
        nm.load_moe_layer(dst)


def test_error_missing_key(make_model, tmp_path):
    dst = _rewrite(make_model("qwen3moe", arch="qwen3moe"), tmp_path / "m.gguf",
                   drop_key="qwen3moe.expert_count")
    with pytest.raises(GGUFError, match="missing metadata key 'qwen3moe.expert_count'"):
        nm.load_moe_layer(dst)


def test_error_key_wrong_type_and_value(make_model, tmp_path):
    src = make_model("qwen3moe", arch="qwen3moe")
    dst = _rewrite(src, tmp_path / "a.gguf", key_value=("qwen3moe.expert_used_count", 9))
    with pytest.raises(GGUFError, match="expert_used_count = 9 exceeds"):
        nm.load_moe_layer(dst)
    dst = _rewrite(src, tmp_path / "b.gguf", key_value=("qwen3moe.embedding_length", 512))
    with pytest.raises(GGUFError, match="ffn_gate_inp.weight' has shape"):
        nm.load_moe_layer(dst)
    dst = _rewrite(src, tmp_path / "c.gguf", key_value=("qwen3moe.expert_count", 0))
    with pytest.raises(GGUFError, match="expert_count' = 0"):
        nm.load_moe_layer(dst)


def test_error_shape_mismatch(make_model, tmp_path):
    dst = _rewrite(make_model("qwen3moe", arch="qwen3moe"), tmp_path / "m.gguf",
                   shape_of="blk.0.ffn_up_exps.weight")
    with pytest.raises(GGUFError, match="ffn_up_exps.weight' has shape"):
        nm.load_moe_layer(dst)


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_error_truncated(make_model, tmp_path, keep):
    src = make_model("qwen3moe", arch="qwen3moe")
    dst = tmp_path / "t.gguf"
    data = open(src, "rb").read()
    dst.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(GGUFError, match=str(dst)):
        nm.load_moe_layer(dst)


def test_error_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        nm.load_moe_layer(p)


def test_writer_rejects_bad_arguments(tmp_path):
    with pytest.raises(MoEError, match="top_k=9 exceeds"):
        nm.write_moe_gguf(tmp_path / "a.gguf", num_experts=8, top_k=9)
    with pytest.raises(MoEError, match="not a multiple"):
        nm.write_moe_gguf(tmp_path / "b.gguf", hidden_size=100)
    with pytest.raises(MoEError, match="init="):
        nm.write_moe_gguf(tmp_path / "c.gguf", init="zeros")


def test_random_blocks_are_finite(tmp_path):
    path = nm.write_moe_gguf(tmp_path / "r.gguf", init="random_blocks", seed=3)
    layer = nm.load_moe_layer(path)
    for t in layer.expert_tensors:
        w = nm.quants.dequantize(t.data, t.qtype)
        assert np.isfinite(w).all()
        assert 0.001 < np.abs(w).mean() < 1.0, t.name

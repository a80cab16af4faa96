"""Block codecs: numba_moe.quants against gguf-py and llama.cpp's quantizer.

Dequantization is checked bit for bit against ``gguf.quants.dequantize``
(random bytes included, NaN where gguf gives NaN).  The k-quant quantizers are
checked byte for byte against blocks produced by llama.cpp's own
``quantize_row_q{4,5,6}_K_ref`` (``tests/data/ggml_kquant_ref.npz``, see the
README beside it), and for round-trip error against a plain round-to-nearest
encoder with the same block layout.
"""
import pathlib
import warnings

import gguf
import numpy as np
import pytest

import numba_moe.quants as q
from numba_moe.errors import MoEError
from numba_moe.quants import dequant as dequant_mod

T = gguf.GGMLQuantizationType
NATIVE = ["Q4_K", "Q5_K", "Q6_K", "Q8_0"]
KQUANTS = ["Q4_K", "Q5_K", "Q6_K"]
DATA = pathlib.Path(__file__).parent / "data" / "ggml_kquant_ref.npz"

# Relative RMS round-trip error on N(0, 1) data (measured: Q4_K 0.0714,
# Q5_K 0.0361, Q6_K 0.0177, Q8_0 0.0054), bounds with ~5% margin.
REL_RMSE_BOUND = {"Q4_K": 0.075, "Q5_K": 0.038, "Q6_K": 0.019, "Q8_0": 0.006}


def geometry(name):
    return gguf.GGML_QUANT_SIZES[T[name]]


def gguf_dequant(data, name):
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(data, T[name])


def f16_bytes(v):
    return np.frombuffer(np.float16(v).tobytes(), np.uint8)


def rel_rmse(approx, exact):
    approx = approx.astype(np.float64)
    exact = exact.astype(np.float64)
    return np.sqrt(np.mean((approx - exact) ** 2) / np.mean(exact ** 2))


# --------------------------------------------------------------------------
# dequantize: bit-exact with gguf


@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize("lead", [(), (3,), (2, 1, 3)])
def test_dequantize_random_bytes_bit_exact(name, lead):
    values, nbytes = geometry(name)
    rng = np.random.default_rng(10 * NATIVE.index(name) + len(lead))
    data = rng.integers(0, 256, lead + (5 * nbytes,), dtype=np.uint8)
    out = q.dequantize(data, name)
    ref = gguf_dequant(data, name)
    assert out.dtype == np.float32
    assert out.shape == lead + (5 * values,)
    assert np.array_equal(out, ref, equal_nan=True)


@pytest.mark.parametrize("name", NATIVE)
def test_dequantize_accepts_enum_and_lowercase(name):
    values, nbytes = geometry(name)
    data = np.random.default_rng(1).integers(0, 256, (2, nbytes), dtype=np.uint8)
    a = q.dequantize(data, T[name])
    b = q.dequantize(data, name.lower())
    assert np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("name", NATIVE)
def test_dequantize_real_looking_data_bit_exact(name):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((4, 3, 512)) * 0.05).astype(np.float32)
    blocks = q.quantize(x, name)
    out = q.dequantize(blocks, name)
    assert np.isfinite(out).all()
    assert np.array_equal(out, gguf_dequant(blocks, name))


@pytest.mark.parametrize("name", NATIVE)
def test_block_driver_writes_every_value(name):
    values, nbytes = geometry(name)
    rng = np.random.default_rng(3)
    blocks = q.quantize(rng.standard_normal((7, values)).astype(np.float32), name)
    out = np.full((7, values), np.nan, np.float32)
    dequant_mod._NATIVE_DRIVERS[T[name]](blocks, out)
    assert np.isfinite(out).all()
    assert np.array_equal(out, gguf_dequant(blocks, name))


@pytest.mark.parametrize("name", NATIVE)
def test_exported_block_decoder(name):
    values, nbytes = geometry(name)
    data = np.random.default_rng(4).integers(0, 256, nbytes, dtype=np.uint8)
    out = np.full(values, np.nan, np.float32)
    getattr(q, f"dequant_block_{name.lower()}")(data, out)
    assert np.array_equal(out, gguf_dequant(data, name), equal_nan=True)


def test_dequantize_non_contiguous_input():
    values, nbytes = geometry("Q6_K")
    data = np.random.default_rng(5).integers(0, 256, (6, 2 * nbytes), dtype=np.uint8)
    strided = data[::2]
    fortran = np.asfortranarray(data)
    assert np.array_equal(q.dequantize(strided, "Q6_K"), gguf_dequant(np.ascontiguousarray(strided), "Q6_K"), equal_nan=True)
    assert np.array_equal(q.dequantize(fortran, "Q6_K"), gguf_dequant(data, "Q6_K"), equal_nan=True)


def test_dequantize_empty():
    values, nbytes = geometry("Q4_K")
    assert q.dequantize(np.zeros((0, 2 * nbytes), np.uint8), "Q4_K").shape == (0, 2 * values)
    assert q.dequantize(np.zeros((3, 0), np.uint8), "Q4_K").shape == (3, 0)


def test_f32_is_a_view():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    raw = x.view(np.uint8)
    out = q.dequantize(raw, "F32")
    assert out.shape == (3, 4)
    assert np.shares_memory(out, x)
    assert np.array_equal(out, x)


# --------------------------------------------------------------------------
# hand-made blocks (layouts written out independently of the kernels)


def pack_scale_min_k4(sc, mn):
    """12-byte packing of eight 6-bit scales and mins, from SPEC / gguf-py."""
    out = np.zeros(12, np.uint8)
    for j in range(4):
        out[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        out[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6)
        out[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4)
    return out


def test_hand_made_q8_0():
    qs = np.array([-128, -1, 0, 1, 127] + list(range(-13, 14)), np.int8)
    blk = np.concatenate([f16_bytes(0.5), qs.view(np.uint8)])
    assert np.array_equal(q.dequantize(blk, "Q8_0"), qs.astype(np.float32) * 0.5)


def test_hand_made_q4_k():
    sc = np.array([1, 2, 3, 63, 16, 17, 32, 48], np.uint8)
    mn = np.array([0, 5, 63, 1, 31, 32, 15, 47], np.uint8)
    vals = np.arange(256) % 16
    qs = np.zeros(128, np.uint8)
    for c in range(4):
        qs[32 * c:32 * c + 32] = vals[64 * c:64 * c + 32] | (vals[64 * c + 32:64 * c + 64] << 4)
    blk = np.concatenate([f16_bytes(0.25), f16_bytes(0.125), pack_scale_min_k4(sc, mn), qs])
    sub = np.arange(256) // 32
    expected = 0.25 * sc[sub] * vals - 0.125 * mn[sub]
    assert np.array_equal(q.dequantize(blk, "Q4_K"), expected.astype(np.float32))


def test_hand_made_q5_k():
    sc = np.array([63, 1, 2, 3, 40, 41, 42, 43], np.uint8)
    mn = np.array([3, 2, 1, 0, 60, 61, 62, 63], np.uint8)
    vals = (np.arange(256) * 7) % 32
    qh = np.zeros(32, np.uint8)
    qs = np.zeros(128, np.uint8)
    for c in range(4):
        lo = vals[64 * c:64 * c + 32]
        hi = vals[64 * c + 32:64 * c + 64]
        qs[32 * c:32 * c + 32] = (lo & 15) | ((hi & 15) << 4)
        qh |= ((lo >> 4) << (2 * c)).astype(np.uint8) | ((hi >> 4) << (2 * c + 1)).astype(np.uint8)
    blk = np.concatenate([f16_bytes(2.0), f16_bytes(0.5), pack_scale_min_k4(sc, mn), qh, qs])
    sub = np.arange(256) // 32
    expected = 2.0 * sc[sub] * vals - 0.5 * mn[sub]
    assert np.array_equal(q.dequantize(blk, "Q5_K"), expected.astype(np.float32))


def test_hand_made_q6_k():
    scales = np.array([-128, -1, 0, 1, 127, 5, -7, 9, 11, -13, 15, 17, 19, 21, -23, 25], np.int8)
    vals = (np.arange(256) * 5) % 64  # stored 0..63, value q - 32
    ql = np.zeros(128, np.uint8)
    qh = np.zeros(64, np.uint8)
    for h in range(2):
        a, b, c, e = (vals[128 * h + 32 * k:128 * h + 32 * k + 32] for k in range(4))
        ql[64 * h:64 * h + 32] = (a & 15) | ((c & 15) << 4)
        ql[64 * h + 32:64 * h + 64] = (b & 15) | ((e & 15) << 4)
        qh[32 * h:32 * h + 32] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)
    blk = np.concatenate([ql, qh, scales.view(np.uint8), f16_bytes(0.0625)])
    expected = 0.0625 * scales[np.arange(256) // 16].astype(np.float64) * (vals - 32)
    assert np.array_equal(q.dequantize(blk, "Q6_K"), expected.astype(np.float32))


def test_inf_nan_scales_propagate():
    values, nbytes = geometry("Q4_K")
    blk = np.zeros((3, nbytes), np.uint8)
    blk[:, 4:16] = pack_scale_min_k4(np.full(8, 3, np.uint8), np.full(8, 2, np.uint8))
    blk[0, 0:2] = f16_bytes(np.inf)
    blk[1, 2:4] = f16_bytes(np.nan)
    blk[2, 0:2] = f16_bytes(np.inf)
    blk[2, 4:16] = 0
    out = q.dequantize(blk, "Q4_K")
    assert np.array_equal(out, gguf_dequant(blk, "Q4_K"), equal_nan=True)
    assert np.isnan(out[0]).all()  # (inf * 3) * 0 quants
    assert np.isnan(out[1]).all()  # NaN * 2 mins
    assert np.isnan(out[2]).all()  # inf * scale code 0


# --------------------------------------------------------------------------
# quantize


@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_matches_llama_cpp_reference_bytes(name):
    ref = np.load(DATA)
    with np.errstate(all="ignore"):
        ours = q.quantize(ref["x"], name)
    assert ours.dtype == np.uint8
    mismatch = np.nonzero((ours != ref[name]).any(axis=1))[0]
    assert mismatch.size == 0, f"{name}: blocks {mismatch.tolist()} differ from llama.cpp"


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
def test_q8_0_quantize_bit_exact_with_gguf(lead):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(lead + (128,)).astype(np.float32)
    x.reshape(-1, 32)[0] = 0.0
    x.reshape(-1, 32)[-1, :4] = [127.0, 0.5, -0.5, 1.5]  # ties: round half away from zero
    assert np.array_equal(q.quantize(x, "Q8_0"), gguf.quants.quantize(x, T.Q8_0))


@pytest.mark.parametrize("name", NATIVE)
def test_quantize_shapes_and_input_dtypes(name):
    values, nbytes = geometry(name)
    x64 = np.random.default_rng(7).standard_normal((2, 3, 2 * values))
    out = q.quantize(x64, name)
    assert out.shape == (2, 3, 2 * nbytes) and out.dtype == np.uint8
    assert np.array_equal(out, q.quantize(x64.astype(np.float32), name))
    assert np.array_equal(q.quantize(x64[0, 0], name), out[0, 0])
    assert q.quantize(np.zeros((0, values), np.float32), name).shape == (0, nbytes)


@pytest.mark.parametrize("name", NATIVE)
def test_round_trip_error_bounds(name):
    x = np.random.default_rng(8).standard_normal((32, 2048)).astype(np.float32)
    err = rel_rmse(q.dequantize(q.quantize(x, name), name), x)
    assert err < REL_RMSE_BOUND[name]


def _f16(v):
    return np.asarray(v, np.float32).astype(np.float16).astype(np.float32)


def _rtn_q45_k(x, nmax):
    """Plain round-to-nearest in the Q4_K/Q5_K layout: per 32-value sub-block
    scale (max - min) / nmax and min, 6-bit codes under fp16 super-scales."""
    s = x.reshape(-1, 8, 32)
    lo = np.minimum(s.min(-1), 0)
    sc = (s.max(-1) - lo) / nmax
    mn = -lo
    d = _f16(sc.max(-1) / 63)[:, None]
    dmin = _f16(mn.max(-1) / 63)[:, None]
    ls = np.clip(np.rint(sc / d), 0, 63)
    lm = np.clip(np.rint(mn / dmin), 0, 63)
    ds = (d * ls)[..., None]
    ms = (dmin * lm)[..., None]
    qv = np.clip(np.rint((s + ms) / np.where(ds > 0, ds, 1)), 0, nmax)
    return (ds * qv - ms).reshape(x.shape)


def _rtn_q6_k(x):
    """Plain round-to-nearest in the Q6_K layout: per 16-value group scale
    amax / 31, 8-bit codes under an fp16 super-scale."""
    s = x.reshape(-1, 16, 16)
    sc = np.abs(s).max(-1) / 31
    d = _f16(sc.max(-1) / 127)[:, None]
    ds = (d * np.clip(np.rint(sc / d), -128, 127))[..., None]
    return (ds * np.clip(np.rint(s / np.where(ds > 0, ds, 1)), -32, 31)).reshape(x.shape)


@pytest.mark.parametrize("name,rtn", [
    ("Q4_K", lambda x: _rtn_q45_k(x, 15)),
    ("Q5_K", lambda x: _rtn_q45_k(x, 31)),
    ("Q6_K", _rtn_q6_k),
])
def test_not_worse_than_round_to_nearest(name, rtn):
    rng = np.random.default_rng(9)
    x = np.concatenate([
        rng.standard_normal((16, 1024)),
        rng.laplace(size=(16, 1024)),
        rng.standard_t(3, size=(16, 1024)),
    ]).astype(np.float32)
    ours = rel_rmse(q.dequantize(q.quantize(x, name), name), x)
    assert ours <= rel_rmse(rtn(x), x)


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K"])
def test_kquant_scale_invariants(name):
    x = np.random.default_rng(10).standard_normal((64, 256)).astype(np.float32)
    blocks = q.quantize(x, name)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
    sc, mn = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
    assert (d > 0).all() and (dmin > 0).all()
    # The largest sub-block scale (and min) is coded as the full 63.
    assert (sc.max(axis=1) == 63).all() and (mn.max(axis=1) == 63).all()
    # Every value decodes inside its sub-block range [-dmin*m, -dmin*m + d*sc*nmax].
    y = q.dequantize(blocks, name).reshape(64, 8, 32)
    step = (d[:, None] * sc)[..., None]
    lo = -(dmin[:, None] * mn)[..., None]
    nmax = 15 if name == "Q4_K" else 31
    assert (y >= lo - 1e-6).all() and (y <= lo + step * nmax + 1e-6).all()


def test_q6_k_scale_invariants():
    x = np.random.default_rng(11).standard_normal((64, 256)).astype(np.float32)
    blocks = q.quantize(x, "Q6_K")
    scales = blocks[:, 192:208].view(np.int8)
    # ggml maps the largest-magnitude group scale to the code -128.
    assert (scales.min(axis=1) == -128).all()
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
    assert (d != 0).all()


def test_all_zero_blocks():
    x = np.zeros((2, 256), np.float32)
    for name in KQUANTS:
        blocks = q.quantize(x, name)
        assert not blocks.any()
        assert (q.dequantize(blocks, name) == 0).all()


# --------------------------------------------------------------------------
# fallback


@pytest.mark.parametrize("name", ["F16", "BF16", "Q4_0", "Q5_1", "Q2_K", "Q3_K", "IQ4_XS"])
def test_fallback_warns_once_and_matches_gguf(name, monkeypatch):
    monkeypatch.setattr(dequant_mod, "_FALLBACK_WARNED", set())
    values, nbytes = geometry(name)
    data = np.random.default_rng(12).integers(0, 256, (3, 2 * nbytes), dtype=np.uint8)
    with pytest.warns(UserWarning, match=name):
        out = q.dequantize(data, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = q.dequantize(data, name)
    ref = gguf_dequant(data, name)
    assert out.shape == ref.shape == (3, 2 * values)
    assert out.dtype == np.float32
    assert np.array_equal(out, ref, equal_nan=True)
    assert np.array_equal(again, ref, equal_nan=True)


def test_quantize_fallback_through_gguf():
    x = np.random.default_rng(13).standard_normal((2, 64)).astype(np.float32)
    assert np.array_equal(q.quantize(x, "Q4_0"), gguf.quants.quantize(x, T.Q4_0))


# --------------------------------------------------------------------------
# helpers and errors


def test_as_qtype_and_row_bytes():
    assert q.as_qtype("Q4_K") is T.Q4_K
    assert q.as_qtype(" q6_k ") is T.Q6_K
    assert q.as_qtype(T.Q8_0) is T.Q8_0
    assert q.as_qtype(int(T.Q5_K)) is T.Q5_K
    assert q.NATIVE_TYPES == (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
    assert q.row_bytes("Q4_K", 2048) == 8 * 144
    assert q.row_bytes(T.Q8_0, 64) == 68
    assert q.block_geometry("Q6_K") == (256, 210)


@pytest.mark.parametrize("bad", ["Q4_KM", "", 9999, 1.5, None, True])
def test_as_qtype_rejects(bad):
    with pytest.raises(MoEError, match="qtype"):
        q.as_qtype(bad)


@pytest.mark.parametrize("n", [100, -256, 256.0])
def test_row_bytes_rejects(n):
    with pytest.raises(MoEError, match="n_values"):
        q.row_bytes("Q4_K", n)


def test_dequantize_errors():
    with pytest.raises(MoEError, match="unknown GGML quantization type name 'Q4_X'"):
        q.dequantize(np.zeros(144, np.uint8), "Q4_X")
    with pytest.raises(MoEError, match="dtype uint8"):
        q.dequantize(np.zeros(144, np.float32), "Q4_K")
    with pytest.raises(MoEError, match="not a multiple of the Q4_K block size of 144 bytes"):
        q.dequantize(np.zeros((2, 145), np.uint8), "Q4_K")
    with pytest.raises(MoEError, match="0-d"):
        q.dequantize(np.array(3, np.uint8), "Q8_0")
    with pytest.raises(MoEError, match="numpy uint8 array"):
        q.dequantize(bytes(144), "Q4_K")
    with pytest.raises(MoEError, match="Q8_K cannot be dequantized"):
        q.dequantize(np.zeros(292, np.uint8), "Q8_K")


def test_quantize_errors():
    with pytest.raises(MoEError, match="float16/float32/float64"):
        q.quantize(np.zeros(256, np.int32), "Q4_K")
    with pytest.raises(MoEError, match="not a multiple of the Q6_K block size 256"):
        q.quantize(np.zeros((2, 300), np.float32), "Q6_K")
    with pytest.raises(MoEError, match="0-d"):
        q.quantize(np.float32(1.0), "Q8_0")
    with pytest.raises(MoEError, match="IQ2_XXS cannot be quantized"):
        q.quantize(np.zeros(256, np.float32), "IQ2_XXS")

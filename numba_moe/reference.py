"""Reference MoE forwards, for tests and ``NUMBA_MOE_PATH=reference``.

* :func:`moe_forward_reference`: the seed's per-pair loop (ferrum's
  ``moe_forward_cpu``) in float32 numpy over ``ExpertTensor.dense()``: for
  every token, for every k, gate/up -> SiLU * up -> down -> weighted
  accumulate.  Slow and simple; it routes exactly as the fast path does
  (``MoELayer.route``, the same router kernel), so both run the same experts.
* :func:`moe_forward_float64`: the same math in float64 from
  ``gguf.quants.dequantize`` of the very same tensor bytes (independent of
  this package's decoders), one expert at a time.  The accuracy oracle of the
  CPU and CUDA tests.

Both include the shared expert: qwen2moe scales it by
``sigmoid(x . gate_inp)``, deepseek2 adds it unscaled.
"""
from __future__ import annotations

import gguf
import numpy as np

__all__ = ["moe_forward_reference", "moe_forward_float64"]

Q = gguf.GGMLQuantizationType


def _silu(v):
    return v / (1.0 + np.exp(-v))


def moe_forward_reference(layer, x: np.ndarray) -> np.ndarray:
    """Per-pair float32 forward over dense weights (the seed's reference loop).

    Parameters
    ----------
    layer : MoELayer
    x : ndarray of float32, shape (T, H)

    Returns
    -------
    ndarray of float32, shape (T, H)

    Notes
    -----
    Dequantizes every expert tensor to float32 on first use
    (``ExpertTensor.dense()`` caches it): memory ``4 * E * 3 * I * H`` bytes.
    """
    x = layer.check_input(x)
    r = layer.route(x)
    gate, up, down = layer.gate.dense(), layer.up.dense(), layer.down.dense()
    T, H = x.shape
    out = np.zeros((T, H), dtype=np.float32)
    for t in range(T):
        xt = x[t]
        for k in range(layer.top_k):
            e = int(r.expert_ids[t, k])
            w = r.expert_weights[t, k]
            h = _silu(gate[e] @ xt) * (up[e] @ xt)
            out[t] += w * (down[e] @ h)
    if layer.shared is not None:
        s = layer.shared
        sg, su, sd = s.gate.dense()[0], s.up.dense()[0], s.down.dense()[0]
        for t in range(T):
            xt = x[t]
            y = sd @ (_silu(sg @ xt) * (su @ xt))
            if s.gate_inp is not None:
                y = y * np.float32(1.0 / (1.0 + np.exp(-np.float64(xt @ s.gate_inp))))
            out[t] += y
    return out


def _expert_f64(t, e: int) -> np.ndarray:
    """Float64 weights of expert ``e`` of ExpertTensor ``t`` via gguf-py."""
    if t.qtype == Q.F32:
        return np.asarray(t.data[e], dtype=np.float64)
    raw = np.ascontiguousarray(t.data[e]).view(np.uint8)
    return gguf.quants.dequantize(raw, t.qtype).reshape(t.rows, t.cols).astype(np.float64)


def _ffn_f64(gate, up, down, e: int, xs: np.ndarray) -> np.ndarray:
    g = xs @ _expert_f64(gate, e).T
    u = xs @ _expert_f64(up, e).T
    return (_silu(g) * u) @ _expert_f64(down, e).T


def moe_forward_float64(layer, x: np.ndarray, route=None) -> np.ndarray:
    """Float64 forward from ``gguf.quants.dequantize`` of the layer's tensors.

    Parameters
    ----------
    layer : MoELayer
    x : ndarray of float, shape (T, H)
        Promoted to float64.
    route : RouterOutput, optional
        Routing to use (default: the fast path's own,
        ``layer.route(x)``, the same router kernel, so both evaluate the same
        experts).

    Returns
    -------
    ndarray of float64, shape (T, H)
    """
    if route is None:
        route = layer.route(np.ascontiguousarray(x, dtype=np.float32))
    ids = np.asarray(route.expert_ids)
    wts = np.asarray(route.expert_weights, dtype=np.float64)
    x64 = np.asarray(x, dtype=np.float64)
    out = np.zeros(x64.shape, dtype=np.float64)
    for e in np.unique(ids):
        tok, kk = np.nonzero(ids == e)
        y = _ffn_f64(layer.gate, layer.up, layer.down, int(e), x64[tok])
        np.add.at(out, tok, wts[tok, kk][:, None] * y)
    if layer.shared is not None:
        s = layer.shared
        y = _ffn_f64(s.gate, s.up, s.down, 0, x64)
        if s.gate_inp is not None:
            y *= 1.0 / (1.0 + np.exp(-(x64 @ np.asarray(s.gate_inp, dtype=np.float64))))[:, None]
        out += y
    return out

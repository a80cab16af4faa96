"""Expert weights on the device: the stored blocks, uploaded once.

The GEMM kernels read four device arrays per weight tensor (``planes``):

=======  ==========================================================  =======
type     planes (wa, wb, wc, wd)                                      bytes
=======  ==========================================================  =======
Q4_K     raw blocks as uint32 (d, dmin: word 0), -, -, -              same
Q5_K     raw blocks as uint32 (d, dmin: word 0), -, -, -              same
Q6_K     ql uint32, qh uint32, scales uint32, d fp16                  same
Q8_0     qs uint32, -, -, d fp16                                      same
F32      values float32, -, -, -                                      4/value
=======  ==========================================================  =======

Q4_K and Q5_K blocks (144 and 176 bytes) are multiples of 16 bytes, so the
raw bytes already allow 16-byte loads.  Q6_K (210 bytes) and Q8_0 (34)
blocks are not even 4-byte aligned in a row; their fields are split into
planes on upload: the same bits and the same byte count, each plane
aligned.  Any other type (and a gate/up pair of different types) is
dequantized once to float32 (:meth:`ExpertTensor.dense`, which warns).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Tuple

import gguf
import numpy as np
from numba import cuda

from ..errors import MoEError
from ..experts import ExpertTensor
from .decoders import F32, QINFO, QInfo

__all__ = ["DeviceWeights", "upload_weights", "upload_dense"]

Q = gguf.GGMLQuantizationType


@dataclasses.dataclass(eq=False)
class DeviceWeights:
    """One stacked projection ``W[e] : cols -> rows`` resident on the device.

    Attributes
    ----------
    name : str
        Source tensor name.
    qtype : gguf.GGMLQuantizationType
        Type the planes hold (``F32`` for dequantized fallbacks).
    num_experts, rows, cols : int
    planes : tuple of 4 device arrays
        See the module docstring.
    nbytes : int
        Device bytes of the planes.
    """

    name: str
    qtype: Q
    num_experts: int
    rows: int
    cols: int
    planes: Tuple
    nbytes: int

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Logical float shape ``(E, rows, cols)``."""
        return (self.num_experts, self.rows, self.cols)

    @property
    def info(self) -> QInfo:
        """Decoder description of :attr:`qtype`."""
        return QINFO[self.qtype]

    @property
    def nb(self) -> int:
        """Storage blocks per row (the decoders' ``nb``)."""
        return self.cols // self.info.block_values

    @property
    def chunks(self) -> int:
        """32-value chunks per row."""
        return self.cols // 32

    def expert_nbytes(self) -> int:
        """Device bytes of one expert."""
        return self.nbytes // self.num_experts


def _dummies(stream):
    return (cuda.to_device(np.zeros(4, np.uint32), stream=stream),
            cuda.to_device(np.zeros(4, np.float16), stream=stream))


def _planes_of(blocks: np.ndarray, qtype, stream):
    """Device planes of ``blocks`` uint8 [n_blocks, type_size]."""
    du32, df16 = _dummies(stream)
    if qtype in (Q.Q4_K, Q.Q5_K):
        raw = cuda.to_device(np.ascontiguousarray(blocks).reshape(-1), stream=stream)
        return (raw.view(np.uint32), du32, du32, df16)
    if qtype == Q.Q6_K:
        ql, qh, sc, d = (np.ascontiguousarray(blocks[:, a:b]).reshape(-1)
                         for a, b in ((0, 128), (128, 192), (192, 208), (208, 210)))
        return tuple(cuda.to_device(p.view(dt), stream=stream)
                     for p, dt in ((ql, np.uint32), (qh, np.uint32), (sc, np.uint32),
                                   (d, np.float16)))
    if qtype == Q.Q8_0:
        d = np.ascontiguousarray(blocks[:, 0:2]).reshape(-1).view(np.float16)
        qs = np.ascontiguousarray(blocks[:, 2:34]).reshape(-1).view(np.uint32)
        return (cuda.to_device(qs, stream=stream), du32, du32, cuda.to_device(d, stream=stream))
    raise MoEError(f"no device layout for {qtype!r}")


def upload_dense(name: str, dense: np.ndarray, stream=0) -> DeviceWeights:
    """Upload float32 ``dense`` [E, rows, cols] as ``F32`` device weights.

    Parameters
    ----------
    name : str
    dense : ndarray of float32, shape (E, rows, cols)
        ``cols`` must be a multiple of 32.
    stream : numba stream, optional

    Returns
    -------
    DeviceWeights
    """
    if dense.ndim != 3 or dense.shape[2] % 32:
        raise MoEError(f"{name}: dense weights must be [E, rows, cols] with cols a multiple "
                       f"of 32, got shape {dense.shape}")
    flat = np.ascontiguousarray(dense, dtype=np.float32).reshape(-1)
    du32, df16 = _dummies(stream)
    dev = cuda.to_device(flat, stream=stream)
    e, rows, cols = dense.shape
    return DeviceWeights(name, F32, e, rows, cols, (dev, du32, du32, df16), flat.nbytes)


def upload_weights(t: ExpertTensor, stream=0, force_dense: bool = False) -> DeviceWeights:
    """Upload one expert tensor's stored blocks (no dequantization for the
    native types).

    Parameters
    ----------
    t : ExpertTensor
        ``data`` uint8 [E, rows, row_bytes] for native types (any strides;
        the fused gate/up halves are gathered into one contiguous copy on the
        host first).
    stream : numba stream, optional
    force_dense : bool
        Upload float32 weights even for a native type.

    Returns
    -------
    DeviceWeights
    """
    if t.cols % 32:
        raise MoEError(f"{t.name}: the CUDA path needs rows of a multiple of 32 values, "
                       f"got {t.cols}")
    if force_dense or t.qtype not in QINFO or t.qtype == F32:
        return upload_dense(t.name, t.dense(), stream)
    size = gguf.GGML_QUANT_SIZES[t.qtype][1]
    blocks = np.ascontiguousarray(t.data).reshape(-1, size)
    planes = _planes_of(blocks, t.qtype, stream)
    return DeviceWeights(t.name, t.qtype, t.num_experts, t.rows, t.cols, planes,
                         int(blocks.nbytes))


def upload_gate_up(gate: ExpertTensor, up: ExpertTensor, stream=0):
    """Upload gate and up for the fused gate/up kernels, which need one type.

    A pair of different types falls back to float32 for both (warned once
    here; Q4_K_M files store both halves in one type).
    """
    same = gate.qtype == up.qtype and gate.qtype in QINFO
    if not same and gate.qtype != up.qtype:
        warnings.warn(f"{gate.name} ({gate.qtype.name}) and {up.name} ({up.qtype.name}) "
                      "differ in type; the CUDA path dequantizes both to float32",
                      RuntimeWarning, stacklevel=2)
    return (upload_weights(gate, stream, force_dense=not same),
            upload_weights(up, stream, force_dense=not same))

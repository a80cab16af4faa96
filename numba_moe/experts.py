"""The in-memory form of one stacked expert projection.

An :class:`ExpertTensor` is what the loader hands to the kernels: for the
native block types it wraps a zero-copy view of the GGUF memory map.
"""
from __future__ import annotations

import dataclasses
import threading
import warnings
from typing import Optional, Tuple

import gguf
import numpy as np

from .errors import MoEError
from .threading_guard import parallel_launch

__all__ = ["ExpertTensor", "NATIVE_QTYPES"]

Q = gguf.GGMLQuantizationType

#: Block types the CPU and GPU kernels read directly.
NATIVE_QTYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0)


@dataclasses.dataclass(eq=False)
class ExpertTensor:
    """One stacked expert projection ``W[e] : cols -> rows`` for every expert.

    Attributes
    ----------
    name : str
        GGUF tensor name (``blk.N.ffn_gate_exps.weight``); for a half of a
        fused ``ffn_gate_up_exps`` tensor, that tensor's name plus ``[gate]`` /
        ``[up]``.
    qtype : gguf.GGMLQuantizationType
        Storage type of ``data``.
    num_experts, rows, cols : int
        Logical float shape ``(E, rows, cols)``; rows are quantized along
        ``cols`` (the GGUF convention).
    data : numpy.ndarray
        Native block types (:data:`NATIVE_QTYPES`): ``uint8 [E, rows,
        row_bytes]``, a view of the file's memory map (never copied).
        ``F32``: ``float32 [E, rows, cols]`` view.  Any other type: the raw
        ``uint8`` blocks as stored; :meth:`dense` dequantizes them once.
    """

    name: str
    qtype: gguf.GGMLQuantizationType
    num_experts: int
    rows: int
    cols: int
    data: np.ndarray
    _dense: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Logical float shape ``(E, rows, cols)``."""
        return (self.num_experts, self.rows, self.cols)

    @property
    def native(self) -> bool:
        """True when the kernels read ``data`` directly (no float copy)."""
        return self.qtype in NATIVE_QTYPES

    @property
    def nbytes(self) -> int:
        """Bytes of ``data`` (the stored blocks)."""
        return int(self.data.nbytes)

    def expert_nbytes(self) -> int:
        """Bytes of one expert's blocks."""
        return self.nbytes // self.num_experts

    def dense(self) -> np.ndarray:
        """Float32 ``[E, rows, cols]`` weights.

        For ``F32`` this is ``data`` itself.  Any other type is dequantized
        on first call and cached (the slow fallback path: a one-time
        warning says so for non-native types).  Native types are dequantized
        too when asked (the reference paths and tests use it), but the fast
        kernels never call this for them.
        """
        if self.qtype == Q.F32:
            return self.data
        with self._lock:
            if self._dense is None:
                from .quants import dequantize

                if not self.native:
                    warnings.warn(
                        f"{self.name}: {self.qtype.name} has no native kernel; "
                        "dequantizing it to float32 once (slow path, "
                        f"{self.num_experts * self.rows * self.cols * 4 / 2**20:.1f} MiB)",
                        RuntimeWarning, stacklevel=2)
                with parallel_launch():
                    dense = dequantize(self.data, self.qtype).reshape(self.shape)
                self._dense = np.ascontiguousarray(dense, dtype=np.float32)
            return self._dense

    def check_expert_ids(self, ids: np.ndarray, what: str = "expert_ids") -> None:
        """Raise :class:`MoEError` unless every id is in ``[0, num_experts)``."""
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            bad = ids[(ids < 0) | (ids >= self.num_experts)].ravel()[0]
            raise MoEError(f"{what}: expert id {int(bad)} out of range [0, {self.num_experts}) "
                           f"for {self.name}")

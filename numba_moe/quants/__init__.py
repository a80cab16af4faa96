"""GGML block codecs.

``dequantize`` / ``quantize`` mirror ``gguf.quants.dequantize`` /
``gguf.quants.quantize``: uint8 arrays whose last axis holds one row's block
bytes on one side, float32 arrays whose last axis holds the row's values on
the other; leading axes are preserved.

Native Numba kernels cover :data:`NATIVE_TYPES` (Q4_K, Q5_K, Q6_K, Q8_0);
dequantization of any other type falls back to ``gguf.quants`` (warned once
per type).  The one-block decoders ``dequant_block_*`` are exported for use
as reference decoders inside other ``@njit`` code.
"""
from .dequant import (
    dequant_block_q4_k,
    dequant_block_q5_k,
    dequant_block_q6_k,
    dequant_block_q8_0,
    dequantize,
)
from .kquant import quantize
from .qtypes import NATIVE_TYPES, as_qtype, block_geometry, row_bytes

__all__ = [
    "NATIVE_TYPES",
    "as_qtype",
    "block_geometry",
    "row_bytes",
    "dequantize",
    "quantize",
    "dequant_block_q4_k",
    "dequant_block_q5_k",
    "dequant_block_q6_k",
    "dequant_block_q8_0",
]

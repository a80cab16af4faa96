"""GGML quantization type names, block geometry and row sizes.

Geometry always comes from ``gguf.GGML_QUANT_SIZES`` (values per block,
bytes per block), so it cannot drift from the file format library.
"""
import numbers

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import MoEError

__all__ = ["NATIVE_TYPES", "as_qtype", "block_geometry", "row_bytes"]

#: Types with native Numba kernels (dequantize, quantize, CPU/GPU matmuls).
NATIVE_TYPES = (
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
    GGMLQuantizationType.Q8_0,
)


def as_qtype(qtype, name="qtype"):
    """Normalize a quantization type to ``gguf.GGMLQuantizationType``.

    Parameters
    ----------
    qtype : GGMLQuantizationType, str or int
        The enum itself, its name (``"Q4_K"``, case-insensitive) or its
        integer id as stored in GGUF files.
    name : str
        Argument name used in the error message.

    Returns
    -------
    GGMLQuantizationType

    Raises
    ------
    MoEError
        Unknown name or id, or a value of another type.
    """
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    if isinstance(qtype, str):
        try:
            return GGMLQuantizationType[qtype.strip().upper()]
        except KeyError:
            known = ", ".join(t.name for t in GGMLQuantizationType)
            raise MoEError(f"{name}: unknown GGML quantization type name {qtype!r}; expected one of {known}") from None
    if isinstance(qtype, numbers.Integral) and not isinstance(qtype, bool):
        try:
            return GGMLQuantizationType(int(qtype))
        except ValueError:
            raise MoEError(f"{name}: unknown GGML quantization type id {int(qtype)}") from None
    raise MoEError(f"{name}: expected a gguf.GGMLQuantizationType or its name, got {type(qtype).__name__} {qtype!r}")


def block_geometry(qtype):
    """``(values_per_block, bytes_per_block)`` of a quantization type.

    Parameters
    ----------
    qtype : GGMLQuantizationType, str or int
        See :func:`as_qtype`.

    Returns
    -------
    tuple of int
    """
    qt = as_qtype(qtype)
    if qt not in GGML_QUANT_SIZES:
        raise MoEError(f"qtype: {qt.name} has no block geometry in gguf.GGML_QUANT_SIZES")
    block_values, block_bytes = GGML_QUANT_SIZES[qt]
    return int(block_values), int(block_bytes)


def row_bytes(qtype, n_values, name="n_values"):
    """Bytes of one quantized row of ``n_values`` values.

    Parameters
    ----------
    qtype : GGMLQuantizationType, str or int
        See :func:`as_qtype`.
    n_values : int
        Values in the row; must be a non-negative multiple of the block size.
    name : str
        Argument name used in the error message.

    Returns
    -------
    int
        ``n_values // values_per_block * bytes_per_block``.

    Raises
    ------
    MoEError
        ``n_values`` negative, not an integer, or not a multiple of the block.
    """
    qt = as_qtype(qtype)
    block_values, block_bytes = block_geometry(qt)
    if not isinstance(n_values, numbers.Integral) or isinstance(n_values, bool) or n_values < 0:
        raise MoEError(f"{name}: expected a non-negative integer, got {n_values!r}")
    if n_values % block_values:
        raise MoEError(f"{name}: {n_values} is not a multiple of the {qt.name} block size {block_values}")
    return int(n_values) // block_values * block_bytes

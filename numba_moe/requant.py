"""Rewrite the expert tensors of a float GGUF file as k-quants.

``numba-moe quantize IN OUT --type Q4_K_M`` lands here.  Only the stacked
expert tensors (``ffn_*_exps``) and shared-expert tensors (``ffn_*_shexp``)
stored as F32 / F16 / BF16 are quantized, with :func:`numba_moe.quants.quantize`;
every other tensor and all metadata are copied byte for byte.  Tensors are
streamed one at a time, so memory stays at about one tensor.

Mixed recipes follow llama.cpp's ``llama_tensor_get_type``: with ``Q4_K_M``
(``Q5_K_M``) the down projections of the layers ``use_more_bits`` picks (the
first and last eighth, and every third layer between) get Q6_K, the rest Q4_K
(Q5_K).  As in llama.cpp, ``n`` there counts the tensors whose name contains
``ffn_down`` and ``i`` is the block index parsed from the name.
"""
from __future__ import annotations

import os

import gguf
import numpy as np

from .errors import GGUFError, MoEError
from .gguf_io import GGUFFile, copy_metadata
from .quants import dequantize, quantize

__all__ = ["quantize_file", "RECIPES", "tensor_type_for"]

Q = gguf.GGMLQuantizationType

#: recipe -> (base type, type of the promoted down projections, llama_ftype)
RECIPES = {
    "Q4_K_M": (Q.Q4_K, Q.Q6_K, 15),
    "Q5_K_M": (Q.Q5_K, Q.Q6_K, 17),
    "Q6_K": (Q.Q6_K, Q.Q6_K, 18),
    "Q8_0": (Q.Q8_0, Q.Q8_0, 7),
}
_FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def _is_expert_weight(name: str) -> bool:
    return name.endswith(".weight") and ("_exps." in name or "_shexp." in name) \
        and "gate_inp" not in name


def tensor_type_for(name: str, recipe: str, n_ffn_down: int):
    """The type ``recipe`` gives expert tensor ``name`` (None: not an expert weight).

    Parameters
    ----------
    name : str
        GGUF tensor name.
    recipe : {'Q4_K_M', 'Q5_K_M', 'Q6_K', 'Q8_0'}
    n_ffn_down : int
        Number of tensors in the file whose name contains ``ffn_down``.
    """
    if recipe not in RECIPES:
        raise MoEError(f"type={recipe!r}: expected one of {sorted(RECIPES)}")
    if not _is_expert_weight(name):
        return None
    base, more, _ = RECIPES[recipe]
    if "ffn_down" in name:
        try:
            i_layer = int(name.split(".")[1])
        except (IndexError, ValueError):
            raise GGUFError(f"tensor {name!r}: cannot parse the block index") from None
        return more if _use_more_bits(i_layer, n_ffn_down) else base
    return base


def quantize_file(src_path, dst_path, recipe: str, *, progress: bool = True) -> dict:
    """Quantize the expert tensors of ``src_path`` into ``dst_path``.

    Parameters
    ----------
    src_path, dst_path : str or os.PathLike
        Input (float experts) and output GGUF files; ``dst_path`` is
        overwritten.
    recipe : {'Q4_K_M', 'Q5_K_M', 'Q6_K', 'Q8_0'}
    progress : bool
        Show a tqdm progress bar over the bytes processed.

    Returns
    -------
    dict
        ``{tensor name: GGMLQuantizationType}`` of the tensors quantized.

    Raises
    ------
    GGUFError
        Unreadable input, or an expert tensor whose rows do not split into
        the target type's blocks.
    """
    if recipe not in RECIPES:
        raise MoEError(f"type={recipe!r}: expected one of {sorted(RECIPES)}")
    src = GGUFFile(src_path)
    if os.path.abspath(os.fspath(src_path)) == os.path.abspath(os.fspath(dst_path)):
        raise MoEError("quantize: IN and OUT must be different files")
    names = src.tensor_names()
    n_down = sum("ffn_down" in n for n in names)
    plan = {}
    for name in names:
        target = tensor_type_for(name, recipe, n_down)
        if target is None or src.tensor_qtype(name) not in _FLOAT_TYPES:
            continue
        cols = src.tensor_shape(name)[-1]
        block = gguf.GGML_QUANT_SIZES[target][0]
        if cols % block:
            raise GGUFError(f"{src.path}: tensor {name!r} rows have {cols} values, not a "
                            f"multiple of the {target.name} block size {block}")
        plan[name] = target

    w = gguf.GGUFWriter(os.fspath(dst_path), src.arch)
    copy_metadata(src, w, replace={"general.file_type": RECIPES[recipe][2]}
                  if src.has("general.file_type") else None)
    if not src.has("general.file_type"):
        w.add_file_type(RECIPES[recipe][2])
    for name in names:
        t = src.tensor(name)
        if name in plan:
            target = plan[name]
            shape = src.tensor_shape(name)
            block, size = gguf.GGML_QUANT_SIZES[target]
            byte_shape = shape[:-1] + (shape[-1] // block * size,)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8),
                              int(np.prod(byte_shape, dtype=np.int64)), raw_dtype=target)
        else:
            w.add_tensor_info(name, t.data.shape, t.data.dtype, int(t.data.nbytes),
                              raw_dtype=t.tensor_type if t.data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(int(src.tensor(n).n_bytes) for n in names)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="quantize")
    try:
        for name in names:
            t = src.tensor(name)
            if name in plan:
                if bar is not None:
                    bar.set_postfix_str(f"{name} -> {plan[name].name}")
                raw = src.tensor_bytes(name)
                dense = dequantize(raw, t.tensor_type)
                w.write_tensor_data(quantize(np.ascontiguousarray(dense), plan[name]))
            else:
                w.write_tensor_data(np.asarray(t.data))
            if bar is not None:
                bar.update(int(t.n_bytes))
    finally:
        if bar is not None:
            bar.close()
        w.close()
    return plan

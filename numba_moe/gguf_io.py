"""Reading GGUF files: metadata and zero-copy tensor views, with clear errors.

Everything here goes through :class:`gguf.GGUFReader`, which memory-maps the
file; tensor arrays are views of that map.  Every failure is re-raised as
:class:`~numba_moe.errors.GGUFError` naming the file and the key or tensor.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import gguf
import numpy as np

from .errors import GGUFError

__all__ = ["GGUFFile"]

_MISSING = object()


class GGUFFile:
    """A GGUF file opened read-only through its memory map.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Raises
    ------
    GGUFError
        The file is missing, truncated or not GGUF; gguf-py's own exception is
        chained and its text included.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise GGUFError(f"{self.path}: no such file")
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as exc:  # gguf raises ValueError, KeyError, IndexError, ...
            raise GGUFError(f"{self.path}: not a readable GGUF file "
                            f"(truncated or corrupt?): {type(exc).__name__}: {exc}") from exc
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.get_str("general.architecture")

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, arch={self.arch!r}, {len(self._tensors)} tensors)"

    # -- metadata ---------------------------------------------------------

    def has(self, key: str) -> bool:
        """Whether metadata ``key`` is present."""
        return key in self.reader.fields

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The value of metadata ``key`` (scalar, str or list).

        Raises
        ------
        GGUFError
            The key is absent and no ``default`` was given, or its value
            cannot be decoded.
        """
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise GGUFError(f"{self.path}: missing metadata key {key!r}")
            return default
        try:
            return field.contents()
        except Exception as exc:
            raise GGUFError(f"{self.path}: metadata key {key!r} is corrupt: {exc}") from exc

    def get_str(self, key: str, default: Any = _MISSING) -> str:
        """Metadata ``key`` that must be a string."""
        v = self.get(key, default)
        if v is not default and not isinstance(v, str):
            raise GGUFError(f"{self.path}: metadata key {key!r} should be a string, got {v!r}")
        return v

    def get_int(self, key: str, default: Any = _MISSING, *, minimum: Optional[int] = None) -> int:
        """Metadata ``key`` that must be an integer (``>= minimum`` if given)."""
        v = self.get(key, default)
        if v is default:
            return v
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise GGUFError(f"{self.path}: metadata key {key!r} should be an integer, got {v!r}")
        v = int(v)
        if minimum is not None and v < minimum:
            raise GGUFError(f"{self.path}: metadata key {key!r} = {v}, expected >= {minimum}")
        return v

    def get_float(self, key: str, default: Any = _MISSING) -> float:
        """Metadata ``key`` that must be a finite number."""
        v = self.get(key, default)
        if v is default:
            return v
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
            raise GGUFError(f"{self.path}: metadata key {key!r} should be a number, got {v!r}")
        v = float(v)
        if not np.isfinite(v):
            raise GGUFError(f"{self.path}: metadata key {key!r} = {v}, expected a finite number")
        return v

    def get_bool(self, key: str, default: Any = _MISSING) -> bool:
        """Metadata ``key`` that must be a boolean."""
        v = self.get(key, default)
        if v is default:
            return v
        if not isinstance(v, (bool, np.bool_)):
            raise GGUFError(f"{self.path}: metadata key {key!r} should be a bool, got {v!r}")
        return bool(v)

    # -- tensors ----------------------------------------------------------

    def has_tensor(self, name: str) -> bool:
        """Whether tensor ``name`` is in the file."""
        return name in self._tensors

    def tensor_names(self):
        """Names of all tensors, in file order."""
        return list(self._tensors)

    def tensor(self, name: str):
        """The :class:`gguf.ReaderTensor` ``name``.

        Raises
        ------
        GGUFError
            The tensor is not in the file.
        """
        t = self._tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.path}: missing tensor {name!r}")
        return t

    def tensor_qtype(self, name: str) -> gguf.GGMLQuantizationType:
        """Storage type of tensor ``name``."""
        return self.tensor(name).tensor_type

    def tensor_shape(self, name: str) -> tuple:
        """Logical numpy shape (reversed ggml ``ne``) of tensor ``name``."""
        return tuple(int(d) for d in reversed(self.tensor(name).shape.tolist()))

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of tensor ``name`` as a ``uint8`` view of the map.

        The last axis is the bytes of one row (``row_bytes``); leading axes
        follow the logical shape.

        Raises
        ------
        GGUFError
            The tensor's data lies (partly) past the end of the file.
        """
        t = self.tensor(name)
        shape = self.tensor_shape(name)
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        if shape[-1] % block:
            raise GGUFError(f"{self.path}: tensor {name!r} row length {shape[-1]} is not a "
                            f"multiple of the {t.tensor_type.name} block size {block}")
        row_bytes = shape[-1] // block * type_size
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes
        if t.data.nbytes != nbytes or t.data_offset + nbytes > self.reader.data.nbytes:
            raise GGUFError(f"{self.path}: tensor {name!r} ({t.tensor_type.name}, shape {shape}) "
                            f"needs {nbytes} bytes at offset {t.data_offset} but the file has "
                            f"{self.reader.data.nbytes} bytes (truncated?)")
        flat = t.data.reshape(-1).view(np.uint8)
        return flat.reshape(shape[:-1] + (row_bytes,))


def copy_metadata(src: GGUFFile, writer: "gguf.GGUFWriter", *, replace=None, skip=()) -> None:
    """Copy every metadata key of ``src`` into ``writer`` (before its header is written).

    ``general.architecture`` and gguf-py's virtual ``GGUF.*`` fields are left
    to the writer; keys in ``skip`` are dropped; ``replace`` maps a key to a
    new value of the same type.
    """
    replace = replace or {}
    for name, field in src.reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        if name in skip:
            continue
        value = replace.get(name, src.get(name))
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(name, value, vtype, sub_type=sub)
        else:
            writer.add_key_value(name, value, vtype)

"""Reading GGUF files: metadata and zero-copy tensor views, with clear errors.

Everything here goes through :class:`gguf.GGUFReader`, which memory-maps the
file; tensor arrays are views of that map.  Every failure is re-raised as
:class:`~numba_moe.errors.GGUFError` naming the file and the key or tensor.

gguf-py trusts the counts and lengths a file declares: a corrupt array length
makes it loop (and allocate) for as long as the count says, even past the end
of the file.  :func:`_check_header` therefore walks the header first and
checks every count, length, type id and tensor extent against the file size,
so that a hostile header costs one bounded pass and a clear error.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Any, Optional

import gguf
import numpy as np

from .errors import GGUFError

__all__ = ["GGUFFile"]

_MISSING = object()

# Byte sizes of the fixed-size metadata value types, by GGUFValueType id.
_VALUE_SIZES = {int(t): np.dtype(d).itemsize for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()}
_STRING = int(gguf.GGUFValueType.STRING)
_ARRAY = int(gguf.GGUFValueType.ARRAY)
# Fixed part of a header: magic, version, tensor count, kv count.
_PREAMBLE = 24
# ggml tensors have at most GGML_MAX_DIMS = 4 dimensions; nested arrays never
# occur in real files, a few levels are allowed.
_MAX_DIMS = 4
_MAX_ARRAY_DEPTH = 4


class _HeaderWalk:
    """A bounds-checked cursor over the header bytes ``buf`` of file ``path``."""

    def __init__(self, path: str, buf):
        self.path, self.buf, self.size, self.pos = path, buf, len(buf), 0
        self.order = "<"

    def fail(self, what: str):
        raise GGUFError(f"{self.path}: not a readable GGUF file (truncated or corrupt?): {what} "
                        f"(header byte {self.pos} of {self.size})")

    def take(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        if n > self.size - self.pos:
            self.fail(f"{what} runs past the end of the file")
        v = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return v if len(v) > 1 else v[0]

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(f"{what} ({n} bytes) runs past the end of the file")
        self.pos += n

    def name(self, what: str) -> str:
        """A key or tensor name: length-prefixed UTF-8."""
        n = self.take("Q", f"length of {what}")
        start = self.pos
        self.skip(n, what)
        try:
            return bytes(self.buf[start:self.pos]).decode("utf-8")
        except UnicodeDecodeError as exc:
            self.fail(f"{what} is not UTF-8 ({exc.reason} at byte {start + exc.start})")

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _VALUE_SIZES:
            self.skip(_VALUE_SIZES[vtype], what)
        elif vtype == _STRING:
            # values are not decoded: llama.cpp takes any bytes there
            self.skip(self.take("Q", f"length of {what}"), what)
        elif vtype == _ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                self.fail(f"{what}: arrays nested deeper than {_MAX_ARRAY_DEPTH}")
            itype, count = self.take("IQ", f"array header of {what}")
            if itype in _VALUE_SIZES:
                self.skip(count * _VALUE_SIZES[itype], f"{what}: array of {count} items")
                return
            # strings and arrays take at least 8 bytes each
            if count > (self.size - self.pos) // 8:
                self.fail(f"{what}: array of {count} items cannot fit in the file")
            for i in range(count):
                self.value(itype, f"{what}[{i}]", depth + 1)
        else:
            self.fail(f"{what}: unknown value type {vtype}")


def _check_header(path: str) -> None:
    """Check the header of GGUF file ``path`` before gguf-py parses it.

    Every declared count, string or array length, value type, tensor type,
    dimension count and tensor extent must fit the file, so gguf-py's parse
    is bounded by the file size.

    Raises
    ------
    GGUFError
        Naming the metadata key or tensor whose declaration does not fit.
    """
    size = os.path.getsize(path)
    if size < _PREAMBLE:
        raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt?): "
                        f"{size} bytes, shorter than the {_PREAMBLE}-byte GGUF preamble")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        _walk_header(_HeaderWalk(path, mm))


def _walk_header(h: _HeaderWalk) -> None:
    if h.buf[:4] != b"GGUF":
        h.fail("bad magic (expected b'GGUF')")
    h.pos = 4
    version = h.take("I", "version")
    if version & 0xFFFF == 0:
        # gguf-py's test for a file of the other byte order
        h.order = ">"
        version = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version not in gguf.gguf_reader.READER_SUPPORTED_VERSIONS:
        h.fail(f"GGUF version {version}, expected one of "
               f"{gguf.gguf_reader.READER_SUPPORTED_VERSIONS}")
    n_tensors, n_kv = h.take("QQ", "tensor and metadata counts")
    # a key-value pair takes at least 13 bytes, a tensor info 24
    if n_kv > (h.size - h.pos) // 13 or n_tensors > (h.size - h.pos) // 24:
        h.fail(f"declares {n_tensors} tensors and {n_kv} metadata keys, more than the "
               "file can hold")
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = h.name(f"name of metadata key #{i}")
        vtype = h.take("I", f"type of metadata key {key!r}")
        if key == "general.alignment" and vtype == int(gguf.GGUFValueType.UINT32):
            alignment = h.take("I", f"metadata key {key!r}")
            continue
        h.value(vtype, f"metadata key {key!r}")
    extents = []
    for i in range(n_tensors):
        name = h.name(f"name of tensor #{i}")
        n_dims = h.take("I", f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            h.fail(f"tensor {name!r} has {n_dims} dimensions, expected 1 to {_MAX_DIMS}")
        dims = h.take(f"{n_dims}Q", f"dimensions of tensor {name!r}")
        dims = dims if n_dims > 1 else (dims,)
        raw_type, offset = h.take("IQ", f"type and offset of tensor {name!r}")
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            h.fail(f"tensor {name!r} has unknown ggml type {raw_type}")
        if dims[0] % block:
            h.fail(f"tensor {name!r} ({qtype.name}) row length {dims[0]} is not a multiple of "
                   f"the block size {block}")
        n_elems = 1
        for d in dims:
            n_elems *= d
        extents.append((name, offset, n_elems // block * type_size))
    if alignment == 0 or alignment & (alignment - 1):
        h.fail(f"general.alignment = {alignment}, expected a power of two")
    # As llama.cpp's loader demands, tensors are stored in header order, each
    # at the padded end of the previous one: an offset anywhere else (a bit
    # flip that aims a tensor at another's bytes) is corruption.
    data_start = -(-h.pos // alignment) * alignment
    expected = 0
    for name, offset, nbytes in extents:
        if offset != expected:
            h.fail(f"tensor {name!r} has data offset {offset}, expected {expected}")
        expected += -(-nbytes // alignment) * alignment
        if offset + nbytes > h.size - data_start:
            h.fail(f"tensor {name!r} needs {nbytes} bytes at data offset {offset}, past the end "
                   f"of the file")


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
            _check_header(self.path)
        except OSError as exc:  # permissions, I/O errors, a file that vanished
            raise GGUFError(f"{self.path}: cannot read the file: {exc}") from exc
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as exc:  # gguf raises ValueError, KeyError, IndexError, ...
            raise GGUFError(f"{self.path}: not a readable GGUF file "
                            f"(truncated or corrupt?): {type(exc).__name__}: {exc}") from exc
        if self.reader.byte_order != "I":
            # tensor views are raw bytes in file order: a float32 router or
            # fp16 block scale of the other byte order would read as garbage
            raise GGUFError(f"{self.path}: GGUF file of the other byte order (big-endian?) is "
                            "not supported")
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

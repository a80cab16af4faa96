"""Accepting caller arrays on the device: numpy (copied in) or any
``__cuda_array_interface__`` object (numba, CuPy, torch; used in place).

The layer forward reads a caller's array from its interface dictionary
(:func:`device_arg`) and copies through the driver (:class:`Transfers`):
wrapping it in a numba device array and copying with numba's methods cost
about 0.35 ms of host time a call on an H100 machine, eight times the
device time of a one-token forward.  The test-facing kernel wrappers keep
numba's arrays (:func:`as_device_2d`, :func:`check_out`).
"""
from __future__ import annotations

import threading
from typing import NamedTuple, Optional

import numpy as np
from numba import cuda

from ..errors import MoEError
from .primitives import SIMULATOR

__all__ = ["is_device_array", "device_view", "as_device_2d", "check_out", "DeviceArg",
           "device_arg", "interface_arg", "Transfers"]


def is_device_array(obj) -> bool:
    """True for device arrays: objects exposing ``__cuda_array_interface__``
    (under the simulator: its fake device arrays)."""
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return isinstance(obj, FakeCUDAArray)
    return cuda.is_cuda_array(obj)


def device_view(obj):
    """A numba device array viewing the device array ``obj`` (no copy)."""
    return obj if SIMULATOR else cuda.as_cuda_array(obj)


def as_device_2d(name: str, obj, dtype, stream=0):
    """A C-contiguous 2-D device array of ``dtype`` viewing or holding ``obj``.

    Parameters
    ----------
    name : str
        Argument name for error messages.
    obj : numpy.ndarray or __cuda_array_interface__ object
        A device object is wrapped without a copy; a numpy array is copied
        to the device on ``stream``.
    dtype : numpy dtype
        Required element type (never converted).

    Raises
    ------
    MoEError
        Wrong type, dtype, ndim or layout.
    """
    if is_device_array(obj):
        arr = device_view(obj)
    elif isinstance(obj, np.ndarray):
        arr = obj
    else:
        raise MoEError(f"{name} must be a numpy array or a __cuda_array_interface__ array, "
                       f"got {type(obj).__name__}")
    if arr.dtype != np.dtype(dtype):
        raise MoEError(f"{name} must be {np.dtype(dtype).name}, got {arr.dtype}")
    if arr.ndim != 2:
        raise MoEError(f"{name} must be 2-D, got shape {tuple(arr.shape)}")
    if not arr.flags["C_CONTIGUOUS"]:
        raise MoEError(f"{name} must be C-contiguous")
    if isinstance(arr, np.ndarray):
        return cuda.to_device(arr, stream=stream)
    return arr


def check_out(name: str, obj, dtype, shape):
    """``obj`` as a numba device array if it is a C-contiguous device array of
    ``dtype`` and ``shape``; else raise :class:`MoEError`."""
    if not is_device_array(obj):
        raise MoEError(f"{name} must be a device array, got {type(obj).__name__}")
    arr = device_view(obj)
    if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape) \
            or not arr.flags["C_CONTIGUOUS"]:
        raise MoEError(f"{name} must be a C-contiguous {np.dtype(dtype).name} device array of "
                       f"shape {tuple(shape)}, got {arr.dtype} {tuple(arr.shape)}")
    return arr


class DeviceArg(NamedTuple):
    """A caller's device array as read from its ``__cuda_array_interface__``."""

    #: device address of element 0 (None under the simulator)
    ptr: Optional[int]
    shape: tuple
    dtype: np.dtype
    #: C-contiguous (strides absent, or those of a C-contiguous array)
    contiguous: bool
    #: the stream the producer last wrote the array on (None: no wait needed)
    stream: Optional[int]
    #: the caller's object (the simulator copies through it)
    array: object


def _c_contiguous(shape, strides, itemsize: int) -> bool:
    if strides is None:
        return True
    want = itemsize
    for n, st in zip(reversed(shape), reversed(strides)):
        # a dimension of one element may carry any stride
        if n != 1 and st != want:
            return False
        want *= n
    return True


def device_arg(obj) -> Optional[DeviceArg]:
    """``obj`` as a :class:`DeviceArg` if it is a device array, else None
    (see :func:`interface_arg`)."""
    if SIMULATOR:
        if not is_device_array(obj):
            return None
        return DeviceArg(None, tuple(obj.shape), obj.dtype, bool(obj.flags["C_CONTIGUOUS"]),
                         None, obj)
    # torch raises AttributeError here for a CPU tensor: not a device array
    cai = getattr(obj, "__cuda_array_interface__", None)
    return None if cai is None else interface_arg(cai, obj)


def interface_arg(cai: dict, obj=None) -> DeviceArg:
    """The :class:`DeviceArg` of a ``__cuda_array_interface__`` dictionary
    (versions 0 to 3) of the object ``obj``.

    Raises
    ------
    MoEError
        A masked array (``mask``), which the kernels cannot honour.
    """
    if cai.get("mask") is not None:
        raise MoEError("masked device arrays (__cuda_array_interface__ 'mask') are not supported")
    shape = tuple(cai["shape"])
    dtype = np.dtype(cai["typestr"])
    return DeviceArg(int(cai["data"][0]), shape, dtype,
                     _c_contiguous(shape, cai.get("strides"), dtype.itemsize),
                     cai.get("stream"), obj)


class Transfers:
    """Copies between the host, a caller's device arrays and this layer's
    buffers, ordered on ``stream``.

    On a GPU they go through ``cuda.bindings.driver`` (a few microseconds
    of host time each); under the simulator through numba's array methods.
    A caller's array written on another stream (the interface's ``stream``)
    is waited for on the device (an event), not on the host.
    """

    def __init__(self, stream):
        self.stream = stream
        self._threads = threading.local()
        if SIMULATOR:
            return
        from cuda.bindings import driver

        from .graph import check, cu_stream

        self._drv, self._check = driver, check
        self._h = cu_stream(stream)
        self._handle = int(self._h)
        flags = driver.CUevent_flags.CU_EVENT_DISABLE_TIMING
        self._event = check(driver.cuEventCreate(flags), "cuEventCreate")

    def bind_thread(self) -> None:
        """Make numba's CUDA context current in the calling thread, once per
        thread: the driver calls here need it (numba's own calls see to it)."""
        if not SIMULATOR and not getattr(self._threads, "bound", False):
            cuda.current_context()
            self._threads.bound = True

    def _wait(self, arg: DeviceArg) -> None:
        if arg.stream is None or SIMULATOR or int(arg.stream) == self._handle:
            return
        drv = self._drv
        self._check(drv.cuEventRecord(self._event, drv.CUstream(int(arg.stream))),
                    "cuEventRecord")
        self._check(drv.cuStreamWaitEvent(self._h, self._event, 0), "cuStreamWaitEvent")

    def put(self, dst, src, nbytes: int) -> None:
        """Copy ``nbytes`` into the start of our flat device array ``dst``
        from ``src``: a numpy array or a :class:`DeviceArg` (C-contiguous)."""
        if SIMULATOR:
            data = src if isinstance(src, np.ndarray) else src.array
            n = nbytes // dst.dtype.itemsize
            dst[:n].copy_to_device(data.reshape(n), stream=self.stream)
            return
        drv = self._drv
        d = dst.device_ctypes_pointer.value
        if isinstance(src, np.ndarray):
            self._check(drv.cuMemcpyHtoDAsync(d, src.ctypes.data, nbytes, self._h),
                        "cuMemcpyHtoDAsync")
            return
        self._wait(src)
        self._check(drv.cuMemcpyDtoDAsync(d, src.ptr, nbytes, self._h), "cuMemcpyDtoDAsync")

    def give(self, dst: DeviceArg, src, nbytes: int) -> None:
        """Copy the first ``nbytes`` of our flat device array ``src`` into the
        caller's C-contiguous device array ``dst``."""
        if SIMULATOR:
            n = nbytes // src.dtype.itemsize
            dst.array.reshape(n).copy_to_device(src[:n], stream=self.stream)
            return
        self._wait(dst)
        self._check(self._drv.cuMemcpyDtoDAsync(dst.ptr, src.device_ctypes_pointer.value,
                                                nbytes, self._h), "cuMemcpyDtoDAsync")

    def get(self, src, shape, dtype) -> np.ndarray:
        """A new numpy array of ``shape`` and ``dtype`` holding the start of our
        flat device array ``src``, once the stream's work is done."""
        out = np.empty(shape, dtype)
        if SIMULATOR:
            src[:out.size].copy_to_host(out.reshape(-1), stream=self.stream)
        else:
            self._check(self._drv.cuMemcpyDtoHAsync(out.ctypes.data,
                                                    src.device_ctypes_pointer.value,
                                                    out.nbytes, self._h), "cuMemcpyDtoHAsync")
        self.synchronize()
        return out

    def synchronize(self) -> None:
        """Wait on the host for the stream's work."""
        if SIMULATOR:
            self.stream.synchronize()
            return
        self._check(self._drv.cuStreamSynchronize(self._h), "cuStreamSynchronize")

    def __del__(self):
        event = getattr(self, "_event", None)
        if event is not None:
            self._drv.cuEventDestroy(event)

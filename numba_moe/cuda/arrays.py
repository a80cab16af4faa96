"""Accepting caller arrays on the device: numpy (copied in) or any
``__cuda_array_interface__`` object (numba, CuPy, torch; used in place)."""
from __future__ import annotations

import numpy as np
from numba import cuda

from ..errors import MoEError
from .primitives import SIMULATOR

__all__ = ["is_device_array", "device_view", "as_device_2d", "check_out"]


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

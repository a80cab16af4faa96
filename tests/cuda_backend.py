"""Choose the numba.cuda backend for the CUDA tests, before numba.cuda loads.

numba.cuda decides on ``NUMBA_ENABLE_CUDASIM`` when it is first imported, so
the choice is made here, at import, by every ``test_cuda_*`` module before it
imports numba.cuda (nothing else in the test suite imports it): a real
GPU when the CUDA driver reports one, else numba's CUDA simulator with the
launch sizes of ``numba_moe.config.CUDA_LAUNCH`` shrunk so that simulated
blocks stay small.  The CPU tests never import numba.cuda and are unaffected.

Names for the tests: ``cuda`` (the module, or None without numba-cuda),
``SIMULATOR``, ``need_cuda`` (skip mark: no numba-cuda) and ``gpu_only``
(skip mark: runs only on a real GPU; what ``@pytest.mark.cuda`` tests use).
"""
import ctypes
import importlib.util
import os
import sys

import pytest


def _gpu_present() -> bool:
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if lib.cuInit(0) != 0:
            return False
        count = ctypes.c_int(0)
        return lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    return False


_HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None

if _HAVE_NUMBA_CUDA and "numba.cuda" not in sys.modules and not _gpu_present():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    # numba.cuda reads numba.core.config, parsed when numba was first imported
    from numba.core import config as _numba_config

    _numba_config.reload_config()

if _HAVE_NUMBA_CUDA:
    from numba import cuda
    from numba_moe.cuda.primitives import SIMULATOR

    usable = SIMULATOR or cuda.is_available()
else:
    cuda = None
    SIMULATOR = False
    usable = False

if SIMULATOR:
    from numba_moe.config import CUDA_LAUNCH

    # one warp per block, 8x8 output tiles: a simulated block is 32 Python threads
    CUDA_LAUNCH.threads = 32
    CUDA_LAUNCH.scan_threads = 8
    CUDA_LAUNCH.gemv_warps = 1
    CUDA_LAUNCH.topk_warps = 1
    CUDA_LAUNCH.tile_m = 8
    CUDA_LAUNCH.tile_n = 8
    CUDA_LAUNCH.gemv_min_warps = 1
    CUDA_LAUNCH.gemv_single_warps = 1
    CUDA_LAUNCH.router_threads = 32
    # a simulated barrier waits for every Python thread of the block to get
    # the GIL; a shorter switch interval roughly halves the simulated time
    sys.setswitchinterval(1e-3)

need_cuda = pytest.mark.skipif(not usable, reason="numba-cuda (the 'cuda' extra) is not installed, "
                               "or numba.cuda was imported before the simulator could be chosen")
gpu_only = pytest.mark.skipif(SIMULATOR or not usable, reason="needs a real CUDA GPU")

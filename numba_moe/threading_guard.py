"""Serialize parallel kernel launches when Numba's threading layer needs it.

Numba runs ``@njit(parallel=True)`` kernels on one of three threading
layers, picked at the first parallel launch of the process: ``tbb``, ``omp``
(OpenMP) or ``workqueue`` (the built-in fallback when neither library loads).
``tbb`` and ``omp`` accept launches from several Python threads at once;
``workqueue`` does not, and aborts the whole process ("Concurrent access has
been detected", exit status 134) when two threads launch parallel kernels at
the same time.

Wrap every launch of a parallel kernel in :func:`parallel_launch`: under
``workqueue`` it holds a process-wide lock, so launches from different
threads run one after another; under ``tbb`` and ``omp`` it does nothing.

Keep the guard the innermost lock: take it around the kernel calls only,
after any other lock (a layer's workspace lock, a tensor's cache lock), and
take no other lock while holding it.  The lock is re-entrant, so a guarded
launch may call another guarded function on the same thread.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import numba
import numpy as np
from numba import njit, prange

__all__ = ["parallel_launch", "threading_layer", "serializes_launches"]

_LOCK = threading.RLock()
_LAYER: Optional[str] = None
# Threading layers that may not be entered by two Python threads at once.
_UNSAFE_LAYERS = ("workqueue",)


@njit(parallel=True, cache=True)
def _first_launch(a):
    """A trivial parallel kernel: launching it makes Numba pick its threading layer."""
    for i in prange(a.shape[0]):
        a[i] = i


def threading_layer() -> str:
    """Name of Numba's threading layer in this process (``'tbb'``, ``'omp'`` or ``'workqueue'``).

    Numba picks the layer at the first parallel launch; this function makes
    that launch (under the guard's lock) if nothing has launched yet.
    """
    global _LAYER
    if _LAYER is None:
        with _LOCK:
            if _LAYER is None:
                _first_launch(np.zeros(2, dtype=np.int64))
                _LAYER = numba.threading_layer()
    return _LAYER


def serializes_launches() -> bool:
    """True when :func:`parallel_launch` takes its lock (the layer is not thread-safe)."""
    return threading_layer() in _UNSAFE_LAYERS


@contextlib.contextmanager
def parallel_launch() -> Iterator[None]:
    """Context manager around the launch of one or more ``parallel=True`` kernels.

    Holds a process-wide re-entrant lock when Numba's threading layer is
    ``workqueue`` (not thread-safe); otherwise a no-op.

    Examples
    --------
    >>> with parallel_launch():
    ...     _some_parallel_kernel(a, out)
    """
    if serializes_launches():
        with _LOCK:
            yield
    else:
        yield

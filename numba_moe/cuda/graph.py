"""CUDA graph capture of numba kernel launches (``cuda.bindings.driver``).

Each numba-cuda launch costs tens of microseconds of host time; a forward
of T tokens is a fixed sequence of launches on fixed buffers, so it is
captured once per T and replayed with one ``cuGraphLaunch``.  Capture uses
the relaxed mode on the numba stream's handle; the captured code must not
copy to or from the host, allocate, or compile (warm it up first).
"""
from __future__ import annotations

from typing import Callable

__all__ = ["CapturedGraph", "check", "cu_stream"]


def check(res, what: str):
    """The result of a ``cuda.bindings.driver`` call; raise on an error status."""
    err = res[0]
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err!r}")
    return res[1] if len(res) > 1 else None


def cu_stream(stream):
    """The driver handle (``CUstream``) of a numba stream."""
    from cuda.bindings import driver

    h = stream.handle
    if isinstance(h, driver.CUstream):
        return h
    return driver.CUstream(int(getattr(h, "value", h)))


class CapturedGraph:
    """The kernels ``launch()`` enqueues on ``stream``, captured and instantiated.

    Parameters
    ----------
    stream : numba stream (not the default stream)
    launch : callable
        Enqueues the work on ``stream``; called once, during capture (it
        runs nothing then).
    """

    def __init__(self, stream, launch: Callable[[], None]):
        from cuda.bindings import driver

        self._driver = driver
        self._hstream = cu_stream(stream)
        mode = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
        check(driver.cuStreamBeginCapture(self._hstream, mode), "cuStreamBeginCapture")
        try:
            launch()
        finally:
            graph = check(driver.cuStreamEndCapture(self._hstream), "cuStreamEndCapture")
        self._graph = graph
        self._exec = check(driver.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")

    def replay(self) -> None:
        """Enqueue one replay on the capture stream."""
        check(self._driver.cuGraphLaunch(self._exec, self._hstream), "cuGraphLaunch")

    def __del__(self):
        driver = getattr(self, "_driver", None)
        if driver is None:
            return
        if getattr(self, "_exec", None) is not None:
            driver.cuGraphExecDestroy(self._exec)
        if getattr(self, "_graph", None) is not None:
            driver.cuGraphDestroy(self._graph)

"""Per-phase wall-clock timers, on when ``NUMBA_MOE_PROFILE=1``.

The forward drivers wrap each phase in :func:`phase`; with profiling off it
costs one attribute lookup.  Read the totals with :func:`snapshot` and clear
them with :func:`reset`.

Examples
--------
>>> import numba_moe as nm
>>> nm.profile.reset(); y = layer(x); nm.profile.snapshot()
{'route': {'calls': 1, 'seconds': ...}, 'plan': ..., ...}
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Dict, Iterator

from .config import get_config

__all__ = ["PHASES", "phase", "snapshot", "reset", "enabled"]

#: The phases of one MoE forward, in execution order.
PHASES = ("route", "plan", "gather", "gemm1", "act", "gemm2", "combine")

_lock = threading.Lock()
_totals: Dict[str, list] = {}


def enabled() -> bool:
    """Whether the timers are on (``NUMBA_MOE_PROFILE=1``)."""
    return get_config().profile


@contextlib.contextmanager
def phase(name: str, sync=None) -> Iterator[None]:
    """Time the enclosed block under ``name`` when profiling is on.

    Parameters
    ----------
    name : str
        One of :data:`PHASES` (other names are accepted and reported too).
    sync : callable, optional
        Called before reading the clock at both ends (a CUDA stream
        synchronize), so device work is attributed to the right phase.
    """
    if not get_config().profile:
        yield
        return
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if sync is not None:
            sync()
        dt = time.perf_counter() - t0
        with _lock:
            entry = _totals.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += dt


def snapshot() -> Dict[str, Dict[str, float]]:
    """Totals so far: ``{phase: {"calls": int, "seconds": float}}``."""
    with _lock:
        return {k: {"calls": v[0], "seconds": v[1]} for k, v in _totals.items()}


def reset() -> None:
    """Clear all totals."""
    with _lock:
        _totals.clear()

"""Per-layer scratch memory of the CPU forward, reused across calls.

A :class:`Workspace` holds every buffer one forward needs (router logits,
routing, plan, quantized activations (and their copies in
:data:`~numba_moe.cpu.simd.Q4_K_ORDER`), intermediate and per-slot outputs,
work lists, decode scratch), sized for the largest T seen so far and grown
(never shrunk) when a larger batch arrives; a warm call allocates nothing
but its result.  Each layer has its own workspace, and its ``lock``
serializes forwards of the same layer from several Python threads (two
threads never share scratch); different layers run concurrently.
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional

import numpy as np

from ..plan import BucketPlan
from ..routing import route_scratch_shape
from .gemm import QT_Q4_K, TILE_ROWS, Projection, decode_buffers, projection
from .schedule import max_items

__all__ = ["Workspace", "workspace_for"]

_registry: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()


def _qbufs(rows: int, cols: int):
    """Quantized-activation buffers (codes, block scales, scaled 32-sums)."""
    return (np.zeros((rows, cols), dtype=np.int16),
            np.zeros((rows, (cols + 255) // 256), dtype=np.float32),
            np.zeros((rows, cols // 32 + 1), dtype=np.float32))


class _Branch:
    """Buffers and kernel arguments of one expert set (routed or shared)."""

    def __init__(self, gate: Projection, up: Projection, down: Projection):
        self.gate, self.up, self.down = gate, up, down
        self.num_experts = gate.num_experts
        self.inter = gate.rows
        self.hidden = gate.cols
        self.capacity = 0
        self.items1 = np.zeros((max_items(self.num_experts, self.inter, TILE_ROWS), 3), np.int64)
        self.items2 = np.zeros((max_items(self.num_experts, self.hidden, TILE_ROWS), 3), np.int64)

    def ensure(self, slots: int) -> None:
        """Grow the per-slot buffers to hold ``slots`` rows."""
        if slots <= self.capacity:
            return
        self.h = np.zeros((slots, self.inter), dtype=np.float32)
        self.hq = _qbufs(slots, self.inter)
        self.hp = np.zeros((slots, self.inter), dtype=np.int16)
        self.y = np.zeros((slots, self.hidden), dtype=np.float32)
        self.capacity = slots

    def ensure_bins(self, nbins: int) -> None:
        """Work-run boundaries of both projections for ``nbins`` runs."""
        self.bounds1 = np.zeros(nbins + 1, dtype=np.int64)
        self.bounds2 = np.zeros(nbins + 1, dtype=np.int64)


class Workspace:
    """Scratch of one :class:`~numba_moe.layer.MoELayer` (see the module docstring)."""

    def __init__(self, layer):
        g = layer.gate_up_fused
        inter = layer.expert_intermediate
        self.routed = _Branch(projection(layer.gate, g, 0), projection(layer.up, g, inter),
                              projection(layer.down))
        self.shared: Optional[_Branch] = None
        self.shared_gate = None
        if layer.shared is not None:
            s = layer.shared
            self.shared = _Branch(projection(s.gate), projection(s.up), projection(s.down))
            if s.gate_inp is not None:
                self.shared_gate = np.array(s.gate_inp, dtype=np.float32)
        self.num_experts = layer.num_experts
        self.top_k = layer.top_k
        self.hidden = layer.hidden_size
        self.n_group = layer.n_group
        self.any_native_in = any(p.qt >= 0 for p in (self.routed.gate, self.routed.up)) or (
            self.shared is not None and any(p.qt >= 0 for p in (self.shared.gate, self.shared.up)))
        self.any_q4_k_in = any(p.qt == QT_Q4_K for b in (self.routed, self.shared)
                               if b is not None for p in (b.gate, b.up))
        self.lock = threading.Lock()
        self.capacity = 0
        self.nbins = 0

    def ensure(self, num_tokens: int, nbins: int) -> None:
        """Grow the buffers for ``num_tokens`` tokens and ``nbins`` work runs."""
        if num_tokens > self.capacity:
            cap = max(num_tokens, 2 * self.capacity)
            E, K, H = self.num_experts, self.top_k, self.hidden
            self.logits = np.zeros((cap, E), dtype=np.float32)
            self.ids = np.zeros((cap, K), dtype=np.int32)
            self.weights = np.zeros((cap, K), dtype=np.float32)
            self.route_scratch = np.zeros(route_scratch_shape(cap, E, self.n_group), np.float32)
            self.plan = BucketPlan.empty(cap, K, E)
            self.xq = _qbufs(cap, H)
            self.xp = np.zeros((cap, H), dtype=np.int16)
            self.routed.ensure(cap * K)
            if self.shared is not None:
                self.shared.ensure(cap)
                self.shared_offsets = np.array([0, cap], dtype=np.int64)
                self.shared_tokens = np.arange(cap, dtype=np.int32)
            self.capacity = cap
        if nbins != self.nbins:
            widest = max(self.hidden, self.routed.inter,
                         self.shared.inter if self.shared is not None else 0)
            self.w16, self.dsc, self.dmins = decode_buffers(nbins, widest)
            self.routed.ensure_bins(nbins)
            if self.shared is not None:
                self.shared.ensure_bins(nbins)
            self.nbins = nbins


def workspace_for(layer) -> Workspace:
    """The workspace of ``layer``, created on first use (kept while the layer lives)."""
    ws = _registry.get(layer)
    if ws is None:
        with _registry_lock:
            ws = _registry.get(layer)
            if ws is None:
                ws = Workspace(layer)
                _registry[layer] = ws
    return ws

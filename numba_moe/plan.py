"""Dispatch planning: group the (token, k) pairs of a routing by expert.

A routing of T tokens to K experts each has ``T * K`` pairs, numbered
``p = t * K + k``.  :class:`BucketPlan` sorts them by expert with a stable
counting sort (so pairs of one expert stay in ascending ``p``), which lets
the forward pass run one ``[m_e, H]`` GEMM per active expert and scatter the
results back.  :func:`moe_align_block_size` gives the same order in vLLM's
padded-block form for tiled GPU GEMMs, and :func:`pick_block_size` chooses
the tile height from the expert occupancy.

Terminology: a *slot* is a row of the expert-sorted (packed) buffers; expert
``e`` owns slots ``expert_offsets[e] .. expert_offsets[e+1] - 1``.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Tuple

import numpy as np
from numba import njit

from . import config
from .errors import MoEError

__all__ = ["BucketPlan", "AlignedRouting", "moe_align_block_size", "pick_block_size"]

# Tile heights pick_block_size chooses from, largest first, and the padding
# it tolerates: total padded pairs <= 13/10 of the real pairs (exact integers).
_CANDIDATES = (64, 32, 16)
_BUDGET_NUM, _BUDGET_DEN = 13, 10
_DEFAULT_BLOCK = 16

# Pair, slot and token indices are int32 in the plan, and the padding
# sentinel of moe_align_block_size is T*K itself.
_MAX_PAIRS = 2**31 - 1


class AlignedRouting(NamedTuple):
    """Result of :func:`moe_align_block_size`.

    Attributes
    ----------
    sorted_token_ids : ndarray of int32, shape (num_tokens_post_padded,)
        Pair indices ``p = t * K + k`` grouped by ascending expert, ascending
        within an expert, each expert's run padded to a multiple of the block
        size with the sentinel ``T * K``.
    block_expert_ids : ndarray of int32, shape (num_tokens_post_padded // block_size,)
        Expert that owns each block of ``sorted_token_ids``.
    num_tokens_post_padded : int
        Length of ``sorted_token_ids``.
    """

    sorted_token_ids: np.ndarray
    block_expert_ids: np.ndarray
    num_tokens_post_padded: int


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------

@njit(cache=True)
def _first_bad_id(ids, num_experts):
    """Flat index of the first id outside ``[0, num_experts)``, or -1."""
    flat = ids.ravel()
    for p in range(flat.shape[0]):
        if flat[p] < 0 or flat[p] >= num_experts:
            return p
    return -1


@njit(cache=True)
def _build_plan(ids, weights, expert_offsets, packed_token_idx, pairs_by_token,
                pair_of_slot, pair_weights):
    """Counting sort of the pairs of ``ids`` [T, K] by expert.

    Writes ``expert_offsets`` [E+1] (int64) and the first ``T*K`` entries of
    ``packed_token_idx``, ``pairs_by_token``, ``pair_of_slot`` (int32) and
    ``pair_weights`` (float32).  Ids must already be in range.
    """
    n_tok, top_k = ids.shape
    n_exp = expert_offsets.shape[0] - 1
    expert_offsets[:] = 0
    for t in range(n_tok):
        for k in range(top_k):
            expert_offsets[ids[t, k] + 1] += 1
    for e in range(n_exp):
        expert_offsets[e + 1] += expert_offsets[e]
    # expert_offsets[e] doubles as expert e's write cursor, which leaves it at
    # the old expert_offsets[e+1]; one shift right restores the prefix sums
    # without a cursor array.
    for t in range(n_tok):
        for k in range(top_k):
            e = ids[t, k]
            slot = expert_offsets[e]
            expert_offsets[e] = slot + 1
            p = t * top_k + k
            packed_token_idx[slot] = t
            pairs_by_token[p] = slot
            pair_of_slot[slot] = p
            pair_weights[p] = weights[t, k]
    for e in range(n_exp, 0, -1):
        expert_offsets[e] = expert_offsets[e - 1]
    expert_offsets[0] = 0


@njit(cache=True)
def _pad_prefix(padded, block_size):
    """Turn counts in ``padded[1:]`` into prefix sums of the counts rounded up
    to ``block_size``; returns the padded total."""
    n_exp = padded.shape[0] - 1
    padded[0] = 0
    for e in range(n_exp):
        m = padded[e + 1]
        padded[e + 1] = padded[e] + (m + block_size - 1) // block_size * block_size
    return padded[n_exp]


@njit(cache=True)
def _padded_from_ids(ids, block_size, padded):
    """Padded prefix sums [E+1] of the pair counts of ``ids`` (any shape)."""
    flat = ids.ravel()
    padded[:] = 0
    for p in range(flat.shape[0]):
        padded[flat[p] + 1] += 1
    return _pad_prefix(padded, block_size)


@njit(cache=True)
def _padded_from_offsets(expert_offsets, block_size, padded):
    """Padded prefix sums [E+1] of the counts behind ``expert_offsets``."""
    for e in range(padded.shape[0] - 1):
        padded[e + 1] = expert_offsets[e + 1] - expert_offsets[e]
    return _pad_prefix(padded, block_size)


@njit(cache=True)
def _fill_blocks(padded, block_size, block_expert_ids):
    """``block_expert_ids[b] = e`` for every block inside expert e's padded run."""
    for e in range(padded.shape[0] - 1):
        for b in range(padded[e] // block_size, padded[e + 1] // block_size):
            block_expert_ids[b] = e


@njit(cache=True)
def _align_from_ids(ids, block_size, padded, cursors, sorted_token_ids, block_expert_ids):
    """vLLM's moe_align_block_size fill, in ascending pair order.

    ``padded`` [E+1] from :func:`_padded_from_ids`; ``cursors`` [E] int64 scratch.
    """
    flat = ids.ravel()
    sorted_token_ids[:] = flat.shape[0]
    for e in range(cursors.shape[0]):
        cursors[e] = padded[e]
    for p in range(flat.shape[0]):
        e = flat[p]
        sorted_token_ids[cursors[e]] = p
        cursors[e] += 1
    _fill_blocks(padded, block_size, block_expert_ids)


@njit(cache=True)
def _align_from_plan(expert_offsets, pair_of_slot, num_pairs, block_size, padded,
                     sorted_token_ids, block_expert_ids):
    """Same result as :func:`_align_from_ids`, copied out of a bucket plan."""
    sorted_token_ids[:] = num_pairs
    for e in range(padded.shape[0] - 1):
        start = expert_offsets[e]
        base = padded[e]
        for j in range(expert_offsets[e + 1] - start):
            sorted_token_ids[base + j] = pair_of_slot[start + j]
    _fill_blocks(padded, block_size, block_expert_ids)


@njit(cache=True)
def _reading(arr, total):
    """How ``arr`` [n] int64 describes ``total`` pairs: 1 counts, 2 offsets, 0 neither."""
    s = 0
    nonneg = True
    for i in range(arr.shape[0]):
        s += arr[i]
        if arr[i] < 0:
            nonneg = False
    if nonneg and s == total:
        return 1
    if arr.shape[0] == 0 or arr[0] != 0 or arr[arr.shape[0] - 1] != total:
        return 0
    for i in range(1, arr.shape[0]):
        if arr[i] < arr[i - 1]:
            return 0
    return 2


@njit(cache=True)
def _pick(arr, as_offsets, total):
    """Largest candidate block whose padded total fits the budget, else 16."""
    for bs in _CANDIDATES:
        padded = 0
        if as_offsets:
            for e in range(arr.shape[0] - 1):
                padded += (arr[e + 1] - arr[e] + bs - 1) // bs * bs
        else:
            for e in range(arr.shape[0]):
                padded += (arr[e] + bs - 1) // bs * bs
        if padded * _BUDGET_DEN <= total * _BUDGET_NUM:
            return bs
    return _DEFAULT_BLOCK


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------

def _check_count(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise MoEError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _check_ids(expert_ids, num_experts: int, ndims: Tuple[int, ...]) -> np.ndarray:
    """Integer ids of the allowed ndims, all in ``[0, E)``, as int32 C-contiguous."""
    ids = expert_ids if isinstance(expert_ids, np.ndarray) else np.asarray(expert_ids)
    if ids.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise MoEError(f"expert_ids must be {want}, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise MoEError(f"expert_ids must be an integer array, got dtype {ids.dtype}")
    if ids.size > _MAX_PAIRS:
        raise MoEError(f"expert_ids holds {ids.size} pairs, more than {_MAX_PAIRS}")
    # range check before any cast: int64 2**32 would wrap to 0 as int32
    bad = _first_bad_id(np.ascontiguousarray(ids), num_experts) if ids.size else -1
    if bad >= 0:
        pos = np.unravel_index(bad, ids.shape)
        where = ", ".join(str(int(i)) for i in pos)
        raise MoEError(f"expert_ids[{where}] = {ids[pos]} is outside [0, {num_experts})")
    return np.ascontiguousarray(ids, dtype=np.int32)


def _check_weights(expert_weights, shape) -> np.ndarray:
    w = expert_weights if isinstance(expert_weights, np.ndarray) else np.asarray(expert_weights)
    if w.dtype.kind != "f":
        raise MoEError(f"expert_weights must be a float array, got dtype {w.dtype}")
    if w.shape != shape:
        raise MoEError(f"expert_weights must have the shape of expert_ids {shape}, got {w.shape}")
    return np.ascontiguousarray(w, dtype=np.float32)


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) \
            or int(block_size) not in config.BLOCK_SIZES:
        raise MoEError(f"block_size must be one of {config.BLOCK_SIZES}, got {block_size!r}")
    return int(block_size)


# --------------------------------------------------------------------------
# BucketPlan
# --------------------------------------------------------------------------

class BucketPlan:
    """Pairs of a routing grouped by expert (stable counting sort).

    Build one with :meth:`build`, or allocate once with :meth:`empty` and
    refill with :meth:`rebuild` (no allocation when given int32 / float32
    C-contiguous routings).  Array attributes are views of the plan's
    buffers: a :meth:`rebuild` overwrites what earlier views show.

    Attributes
    ----------
    expert_offsets : ndarray of int64, shape (E + 1,)
        Prefix sums of the pair counts; expert e owns slots
        ``expert_offsets[e] .. expert_offsets[e+1] - 1``.
    packed_token_idx : ndarray of int32, shape (T * K,)
        ``packed_token_idx[slot] = t``: the token whose hidden state the slot
        gathers.
    pairs_by_token : ndarray of int32, shape (T * K,)
        ``pairs_by_token[t * K + k] = slot``: where pair (t, k)'s expert output
        lands; the combine reads it.
    pair_of_slot : ndarray of int32, shape (T * K,)
        Inverse of ``pairs_by_token``: ``pair_of_slot[slot] = t * K + k``.
    pair_weights : ndarray of float32, shape (T * K,)
        ``pair_weights[t * K + k]``: the router weight of pair (t, k).
    num_experts, top_k, num_tokens, max_tokens : int
        E, K, the T of the last (re)build, and the T the buffers hold.
    """

    __slots__ = ("num_experts", "top_k", "max_tokens", "num_tokens", "expert_offsets",
                 "packed_token_idx", "pairs_by_token", "pair_of_slot", "pair_weights",
                 "_packed_buf", "_pairs_buf", "_slots_buf", "_weights_buf")

    def __init__(self, max_tokens: int, top_k: int, num_experts: int):
        self.max_tokens = _check_count("max_tokens", max_tokens, 0)
        self.top_k = _check_count("top_k", top_k, 1)
        self.num_experts = _check_count("num_experts", num_experts, 1)
        n = self.max_tokens * self.top_k
        if n > _MAX_PAIRS:
            raise MoEError(f"max_tokens * top_k = {n} exceeds {_MAX_PAIRS}")
        self.expert_offsets = np.zeros(self.num_experts + 1, dtype=np.int64)
        self._packed_buf = np.zeros(n, dtype=np.int32)
        self._pairs_buf = np.zeros(n, dtype=np.int32)
        self._slots_buf = np.zeros(n, dtype=np.int32)
        self._weights_buf = np.zeros(n, dtype=np.float32)
        self._set_views(0)

    def _set_views(self, num_tokens: int) -> None:
        n = num_tokens * self.top_k
        self.num_tokens = num_tokens
        self.packed_token_idx = self._packed_buf[:n]
        self.pairs_by_token = self._pairs_buf[:n]
        self.pair_of_slot = self._slots_buf[:n]
        self.pair_weights = self._weights_buf[:n]

    @classmethod
    def empty(cls, max_tokens: int, top_k: int, num_experts: int) -> "BucketPlan":
        """A plan with buffers for up to ``max_tokens`` tokens and no pairs yet.

        Parameters
        ----------
        max_tokens : int
            Largest T a later :meth:`rebuild` may pass.
        top_k : int
            K of every routing it will hold.
        num_experts : int
            E.
        """
        return cls(max_tokens, top_k, num_experts)

    @classmethod
    def build(cls, expert_ids, expert_weights, num_experts: int) -> "BucketPlan":
        """Plan one routing.

        Parameters
        ----------
        expert_ids : ndarray of int, shape (T, K)
            Expert of each pair, in ``[0, num_experts)``.
        expert_weights : ndarray of float, shape (T, K)
            Router weight of each pair (stored as float32).
        num_experts : int
            E.

        Returns
        -------
        BucketPlan

        Raises
        ------
        MoEError
            Ids out of range (the message names the first bad position),
            mismatched shapes, non-integer ids or non-float weights.
        """
        num_experts = _check_count("num_experts", num_experts, 1)
        ids = _check_ids(expert_ids, num_experts, (2,))
        if ids.shape[1] < 1:
            raise MoEError(f"expert_ids must have at least one column (K >= 1), got {ids.shape}")
        weights = _check_weights(expert_weights, ids.shape)
        plan = cls(ids.shape[0], ids.shape[1], num_experts)
        plan._fill(ids, weights)
        return plan

    def rebuild(self, expert_ids, expert_weights) -> "BucketPlan":
        """Refill this plan in place from a new routing (Rust ``rebuild_into``).

        Parameters
        ----------
        expert_ids : ndarray of int32, shape (T, K)
            ``T <= max_tokens``, ``K == top_k``, ids in ``[0, num_experts)``.
            Other integer dtypes are range-checked, then converted.
        expert_weights : ndarray of float32, shape (T, K)
            Other float dtypes are converted.

        Returns
        -------
        BucketPlan
            ``self``.

        Raises
        ------
        MoEError
            As :meth:`build`, or T / K that do not fit this plan.
        """
        ids = _check_ids(expert_ids, self.num_experts, (2,))
        if ids.shape[1] != self.top_k:
            raise MoEError(f"expert_ids must have top_k={self.top_k} columns, got {ids.shape}")
        if ids.shape[0] > self.max_tokens:
            raise MoEError(f"expert_ids has {ids.shape[0]} tokens, more than this plan's "
                           f"max_tokens={self.max_tokens}")
        weights = _check_weights(expert_weights, ids.shape)
        self._fill(ids, weights)
        return self

    def _fill(self, ids: np.ndarray, weights: np.ndarray) -> None:
        _build_plan(ids, weights, self.expert_offsets, self._packed_buf, self._pairs_buf,
                    self._slots_buf, self._weights_buf)
        self._set_views(ids.shape[0])

    @property
    def counts(self) -> np.ndarray:
        """int64 [E]: pairs routed to each expert."""
        return np.diff(self.expert_offsets)

    @property
    def num_pairs(self) -> int:
        """T * K of the current routing."""
        return self.num_tokens * self.top_k

    def align(self, block_size: int) -> AlignedRouting:
        """:func:`moe_align_block_size` of the routing this plan holds.

        Parameters
        ----------
        block_size : int
            One of :data:`numba_moe.config.BLOCK_SIZES`.

        Returns
        -------
        AlignedRouting
            Equal to ``moe_align_block_size(expert_ids, E, block_size)``.
        """
        block_size = _check_block_size(block_size)
        padded = np.empty(self.num_experts + 1, dtype=np.int64)
        total = int(_padded_from_offsets(self.expert_offsets, block_size, padded))
        sorted_ids = np.empty(total, dtype=np.int32)
        blocks = np.empty(total // block_size, dtype=np.int32)
        _align_from_plan(self.expert_offsets, self.pair_of_slot, self.num_pairs, block_size,
                         padded, sorted_ids, blocks)
        return AlignedRouting(sorted_ids, blocks, total)

    def __repr__(self) -> str:
        active = int(np.count_nonzero(self.counts))
        return (f"BucketPlan(num_tokens={self.num_tokens}, top_k={self.top_k}, "
                f"num_experts={self.num_experts}, active_experts={active})")


# --------------------------------------------------------------------------
# vLLM-style alignment and block-size choice
# --------------------------------------------------------------------------

def moe_align_block_size(expert_ids, num_experts: int, block_size: int) -> AlignedRouting:
    """Group the pairs by expert and pad every expert's run to whole blocks.

    vLLM's ``moe_align_block_size`` with a deterministic order.

    Parameters
    ----------
    expert_ids : ndarray of int, shape (T, K) (or flat (T * K,))
        Expert of each pair ``p = t * K + k``, in ``[0, num_experts)``.
    num_experts : int
        E.
    block_size : int
        Tile height, one of :data:`numba_moe.config.BLOCK_SIZES`.

    Returns
    -------
    AlignedRouting
        ``sorted_token_ids`` int32: pair indices grouped by ascending expert,
        ascending within an expert, each run padded with the sentinel
        ``T * K`` to a multiple of ``block_size`` (experts with no pairs get
        no blocks); ``block_expert_ids`` int32: the expert of each block;
        ``num_tokens_post_padded``: the sum of the padded runs.

    Raises
    ------
    MoEError
        Ids out of range or not integers, or an unsupported ``block_size``.
    """
    num_experts = _check_count("num_experts", num_experts, 1)
    block_size = _check_block_size(block_size)
    ids = _check_ids(expert_ids, num_experts, (1, 2))
    padded = np.empty(num_experts + 1, dtype=np.int64)
    total = int(_padded_from_ids(ids, block_size, padded))
    sorted_ids = np.empty(total, dtype=np.int32)
    blocks = np.empty(total // block_size, dtype=np.int32)
    cursors = np.empty(num_experts, dtype=np.int64)
    _align_from_ids(ids, block_size, padded, cursors, sorted_ids, blocks)
    return AlignedRouting(sorted_ids, blocks, total)


def pick_block_size(expert_offsets_or_counts, total_pairs: int) -> int:
    """Choose the tile height of the grouped expert GEMM.

    Parameters
    ----------
    expert_offsets_or_counts : ndarray of int, shape (E,) or (E + 1,)
        Pairs per expert (summing to ``total_pairs``), or their prefix sums
        (``BucketPlan.expert_offsets``: from 0, non-decreasing, ending at
        ``total_pairs``).  An array valid both ways reads the same both ways.
    total_pairs : int
        T * K.

    Returns
    -------
    int
        ``NUMBA_MOE_BLOCK_SIZE`` when set (``config.get_config().block_size``);
        else the largest of 64, 32, 16 whose padded total is at most 1.3x
        ``total_pairs`` (compared exactly in integers); else 16.  16 when
        ``total_pairs`` is 0.

    Raises
    ------
    MoEError
        An array that is neither reading, or a negative ``total_pairs``.
    """
    total = _check_count("total_pairs", total_pairs, 0)
    arr = np.asarray(expert_offsets_or_counts)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise MoEError(f"expert_offsets_or_counts must be a 1-D integer array, got "
                       f"shape {arr.shape} dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    reading = _reading(arr, total)
    if reading == 0:
        raise MoEError(
            f"expert_offsets_or_counts must be non-negative counts [E] summing to "
            f"total_pairs={total}, or offsets [E+1] rising from 0 to {total}; got "
            f"{arr.size} entries summing to {int(arr.sum())}")
    forced = config.get_config().block_size
    if forced is not None:
        return forced
    if total == 0:
        return _DEFAULT_BLOCK
    return int(_pick(arr, reading == 2, total))

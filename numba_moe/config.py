"""Runtime knobs, parsed once from ``NUMBA_MOE_*`` environment variables.

Every knob the library reads lives here; kernels and drivers take plain
arguments and never look at the environment themselves.  A bad value is
ignored with a warning that names the variable, and the default is kept.

=========================  =================================================
variable                   meaning
=========================  =================================================
``NUMBA_MOE_BLOCK_SIZE``   force ``pick_block_size`` to 8, 16, 32, 48 or 64
``NUMBA_MOE_PROFILE``      ``1`` turns on the per-phase timers
                           (:mod:`numba_moe.profile`)
``NUMBA_MOE_PATH``         ``fast`` (default) or ``reference``: the CPU
                           forward path ``MoELayer.__call__`` takes
``NUMBA_MOE_CACHE_DIR``    where the embedded default model file is written
                           (default ``~/.cache/numba_moe``)
``NUMBA_MOE_SIMD``         ``0`` keeps the CPU kernels portable on AVX-512
                           hosts (:mod:`numba_moe.cpu.simd`; default ``1``)
=========================  =================================================

Launch sizes of the CUDA kernels live in :data:`CUDA_LAUNCH`, a mutable
object so that tests under the CUDA simulator can shrink them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Iterator, Mapping, Optional

__all__ = ["Config", "parse_env", "get_config", "override", "CudaLaunch", "CUDA_LAUNCH",
           "BLOCK_SIZES"]

#: Block sizes ``moe_align_block_size`` accepts (the Marlin / vLLM tile heights).
BLOCK_SIZES = (8, 16, 32, 48, 64)
_PATHS = ("fast", "reference")


@dataclasses.dataclass(frozen=True)
class Config:
    """Parsed runtime knobs (see the module docstring)."""

    block_size: Optional[int] = None
    profile: bool = False
    path: str = "fast"
    cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "numba_moe")
    simd: bool = True


def _warn(name: str, value: str, expected: str) -> None:
    warnings.warn(f"ignoring {name}={value!r}: expected {expected}", RuntimeWarning, stacklevel=3)


def parse_env(environ: Mapping[str, str]) -> Config:
    """Build a :class:`Config` from a mapping of environment variables.

    Parameters
    ----------
    environ : mapping of str to str
        Usually ``os.environ``; unknown names are ignored.

    Returns
    -------
    Config
        Defaults for every knob that is unset or malformed (malformed values
        are reported with a ``RuntimeWarning`` naming the variable).
    """
    kw = {}
    raw = environ.get("NUMBA_MOE_BLOCK_SIZE")
    if raw is not None and raw != "":
        try:
            bs = int(raw)
        except ValueError:
            bs = None
        if bs in BLOCK_SIZES:
            kw["block_size"] = bs
        else:
            _warn("NUMBA_MOE_BLOCK_SIZE", raw, "one of 8, 16, 32, 48, 64")
    raw = environ.get("NUMBA_MOE_PROFILE")
    if raw is not None and raw != "":
        if raw in ("0", "1"):
            kw["profile"] = raw == "1"
        else:
            _warn("NUMBA_MOE_PROFILE", raw, "0 or 1")
    raw = environ.get("NUMBA_MOE_PATH")
    if raw is not None and raw != "":
        if raw in _PATHS:
            kw["path"] = raw
        else:
            _warn("NUMBA_MOE_PATH", raw, "'fast' or 'reference'")
    raw = environ.get("NUMBA_MOE_SIMD")
    if raw is not None and raw != "":
        if raw in ("0", "1"):
            kw["simd"] = raw == "1"
        else:
            _warn("NUMBA_MOE_SIMD", raw, "0 or 1")
    raw = environ.get("NUMBA_MOE_CACHE_DIR")
    if raw:
        kw["cache_dir"] = os.path.expanduser(raw)
    return Config(**kw)


_CONFIG: Optional[Config] = None


def get_config() -> Config:
    """The process-wide :class:`Config`, parsed from ``os.environ`` on first use."""
    global _CONFIG
    if _CONFIG is None:
        _CONFIG = parse_env(os.environ)
    return _CONFIG


@contextlib.contextmanager
def override(**changes) -> Iterator[Config]:
    """Temporarily replace fields of the process-wide config (for tests).

    Examples
    --------
    >>> with override(block_size=32):
    ...     ...
    """
    global _CONFIG
    old = get_config()
    _CONFIG = dataclasses.replace(old, **changes)
    try:
        yield _CONFIG
    finally:
        _CONFIG = old


@dataclasses.dataclass
class CudaLaunch:
    """Launch sizes of the CUDA kernels; tests under the simulator shrink them.

    Attributes
    ----------
    threads : int
        Threads per block of the element-wise kernels (gather, act, combine).
    scan_threads : int
        Threads per block of the plan kernel (one block per expert, each
        scanning all pairs).
    gemv_warps : int
        Warps per block of the quantized GEMV kernels.
    tile_m, tile_n : int
        Output tile of the tiled (large-T) grouped GEMMs; ``tile_m`` is also
        the block size of the device's ``moe_align_block_size`` layout (one of
        :data:`BLOCK_SIZES`) and the tokens of a tensor-core block; ``tile_m``
        a multiple of 8 and ``tile_n`` of 4 (the per-thread micro-tile of the
        SIMT tiled kernel for dense weights).
    tile_m_small : int
        Largest ``tile_m`` of the routed experts' tiled GEMMs while they hold
        at most ``tile_m`` tokens each on average (``T * K / E``): there the
        tile is the smallest power of two >= twice that mean, at least 8
        (fewer padded tokens, more blocks; capped at ``tile_m``).
    topk_warps : int
        Tokens (one warp each) per block of the routing kernel.
    gemv_max_tokens : int
        Largest average number of tokens per expert (``T * K / E``; ``T`` for
        the shared expert) served by the GEMV kernels; above it the tiled
        ones (tensor cores for quantized weights, SIMT for dense).
    gemv_max_tokens_fp16 : int
        ``gemv_max_tokens`` for routed experts whose gate weights the fp16
        tensor-core kernel reads (Q4_K / Q6_K, compute capability 8.0+): above
        it that kernel beats the GEMV (H100, Qwen3-30B-A3B layer, whole
        forward, fp16 / GEMV: T=16 306 / 252 us, T=32 391 / 431, T=48 402 /
        545).
    pair_slots_max_mean : float
        Largest average number of tokens per expert (``T * K / E``) at which
        the routed GEMVs take one slot per (token, expert) pair straight from
        the routing's ids, with no plan kernel (an expert chosen by two
        tokens is then read twice, the second time mostly from L2).  H100,
        Qwen3-30B-A3B layer, whole forward with the plan / pair slots: T=1
        45.4 / 39.1 us, T=2 64.2 / 57.7, T=4 89.4 / 79.1, T=8 135.8 / 122.1,
        T=16 (one token an expert) 218.2 / 203.8; the GEMVs gain too (more
        blocks: T=16 gate / up 101.7 / 96.6, down 76.7 / 72.2).
    gemv_quantize_max_pairs : int
        Most (token, expert) pairs for which the down GEMV by pair slot
        quantizes its activation rows in each block (redundantly, a row per
        block) instead of after a separate quantization launch, where a
        row's codes fit a block's shared memory
        (:func:`numba_moe.cuda.qgemv.quantize_fits`).  H100,
        Qwen3-30B-A3B layer, whole forward with 8 / 16 / 32 / 64 / 128:
        T=2 53.0 / 48.3 us, T=4 72.5 (16) / 66.8 (32) / 66.6 (64), T=8
        115.0 (16) / 114.8 (32) / 107.1 (64), T=12 156.3 (64) / 144.6
        (128), T=16 194.1 (64) / 181.6 (128), with the down GEMV walking
        Q6_K chunk pairs (before them, down phase alone, separate / in the
        blocks: T=1 11.0 / 9.5 us, T=4 22.4 / 23.5, T=16 71.3 / 81.6).
    router_gemv_max_tokens : int
        Largest token count whose router runs on the GEMV kernel; above it
        the tiled kernel runs, its columns split (``router_split_blocks``).
        The default, ``router_block_max_tokens``, leaves the GEMV unused:
        H100, Qwen3-30B-A3B layer, whole forward at T=64 / 512 / 2048: 559.5
        / 1228.1 / 3191.6 us against 567.9 / 1234.1 / 3334.0 with the GEMV
        router up to 2048 (router alone 8.8 / 24.2 / 72.4 against 21.6 /
        56.5 / 217.4; the routing kernel's sum of 64 / 33 / 9 partial planes
        gives part of it back).
    graphs : bool
        Capture each token count's forward into a CUDA graph and replay it
        (ignored under the simulator and while profiling).
    gemv_min_blocks : int
        Register budget of the GEMV kernel: blocks of 256 threads that must
        fit on one multiprocessor (2: 128 registers a thread; 4, 64 registers,
        spills with several tokens a pass).
    gemv_gate_up_min_blocks : int
        ``gemv_min_blocks`` of the integer GEMV's gate / up kernel at one token
        a pass (every routed GEMV of a Q4_K / Q6_K layer): its 64 registers
        leave room for twice the warps, while the down kernel, whose two sets
        of prefetched weight words need more, loses at 64 (H100, Qwen3-30B-A3B
        layer, gate / up phase at 2 / 3 / 4 blocks: T=1 11.4 / 8.9 / 8.8 us,
        T=16 125.6 / 109.8 / 105.6; down 84.5 / 131.3 / 164.8 at T=16).
    gemv_chunks_per_lane : int
        32-value chunks of a weight row each GEMV lane walks (fewer lanes
        per row when rows are long enough).
    gemv_shared_bytes : int
        Shared memory a GEMV block stages activations in (longer rows are
        staged in tiles).
    gemv_single_warps : int
        Warps per GEMV block when one expert (the router, a shared expert)
        is served: every block stages the same activations, so fewer,
        larger blocks.
    gemv_min_warps : int
        GEMV grids with fewer warps (few rows: the router) spread each row
        over more lanes, up to a warp.
    router_threads : int
        Threads per block of the small-batch router kernel (one block per
        router row, :mod:`numba_moe.cuda.router`).
    router_block_max_tokens : int
        Largest token count whose router runs on that kernel; above it the
        GEMV (up to ``router_gemv_max_tokens``) or the tiled kernel.
    router_split_blocks : int
        Blocks the router's tiled launch aims at: it splits the columns into
        partial sums (added by the routing kernel) until the grid has them
        (H100, T=4096: 314 us unsplit, 140 / 116 / 127 at 264 / 528 / 1056).
    mma_min_blocks : int
        Register budget of the tensor-core kernel (:mod:`numba_moe.cuda.mma`):
        its 128-thread blocks that must fit on one multiprocessor (4: 128
        registers a thread).
    hmma_down_tile_m : int
        Largest token tile of the fp16 tensor-core kernel's down projection
        (a multiple of 8): it takes plan blocks a power of two times larger
        in parts of this many tokens, and a part holding only padding exits
        at once (H100, Qwen3-30B-A3B layer, T=4096, 64-token plan: down phase
        at 64 / 32 / 16-token tiles 1589 / 1444 / 2058 us, whole forward
        3396, 3385 / 3336, 3417 / 3860, 3950 in two passes; T=512, 32-token
        plan: 16-token parts lose, 701 / 730 us).
    row_fast_bytes : int
        Bytes of input rows above which a tiled tensor-core launch runs its
        row blocks fastest (:func:`numba_moe.cuda.mma.row_blocks_fast`):
        between the 33.5 MB of gate / up and the 100 MB of down at T=4096 of
        the Qwen3-30B-A3B layer; an H100's L2 holds 50 MB.
    """

    threads: int = 256
    scan_threads: int = 1024
    gemv_warps: int = 4
    tile_m: int = 64
    tile_n: int = 64
    tile_m_small: int = 32
    topk_warps: int = 4
    gemv_max_tokens: int = 16
    gemv_max_tokens_fp16: int = 1
    pair_slots_max_mean: float = 1.0
    gemv_quantize_max_pairs: int = 128
    router_gemv_max_tokens: int = 16
    graphs: bool = True
    gemv_min_blocks: int = 2
    gemv_gate_up_min_blocks: int = 4
    gemv_chunks_per_lane: int = 4
    gemv_shared_bytes: int = 32768
    gemv_single_warps: int = 8
    gemv_min_warps: int = 264
    router_threads: int = 256
    router_block_max_tokens: int = 16
    router_split_blocks: int = 528
    mma_min_blocks: int = 4
    hmma_down_tile_m: int = 32
    row_fast_bytes: int = 64 << 20


#: The launch sizes every CUDA wrapper reads.
CUDA_LAUNCH = CudaLaunch()

"""numba_moe: Mixture-of-Experts expert dispatch over GGUF k-quant blocks.

Loads one MoE layer of a GGUF model straight from the file's memory map,
routes each token to its top-K experts and runs the experts with Numba
kernels on the CPU (``@njit(parallel=True)``) or ``numba.cuda`` kernels on an
NVIDIA GPU.
"""
from . import config, errors, profile, quants, threading_guard
from .errors import GGUFError, MoEError
from .layer import MoELayer, SharedExpert, load_moe_layer
from .plan import AlignedRouting, BucketPlan, moe_align_block_size, pick_block_size
from .reference import moe_forward_float64, moe_forward_reference
from .routing import RouterOutput, route, route_into
from .writer import write_moe_gguf

__version__ = "0.1.0"

__all__ = [
    # modules
    "config", "errors", "profile", "quants", "threading_guard",
    # errors
    "MoEError", "GGUFError",
    # layers
    "MoELayer", "SharedExpert", "load_moe_layer", "write_moe_gguf",
    # routing and planning
    "route", "route_into", "RouterOutput", "BucketPlan", "moe_align_block_size",
    "AlignedRouting", "pick_block_size",
    # references
    "moe_forward_reference", "moe_forward_float64",
]

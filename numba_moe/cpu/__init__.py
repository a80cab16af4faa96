"""CPU kernels: the MoE forward over compressed GGUF blocks (Numba ``@njit``)."""
from .actquant import quantize_rows
from .combine import combine
from .forward import moe_forward, touched_expert_bytes
from .gemm import grouped_down, grouped_gate_up

__all__ = ["moe_forward", "touched_expert_bytes", "grouped_gate_up", "grouped_down",
           "quantize_rows", "combine"]

"""numba.cuda path: the MoE forward on an NVIDIA GPU (optional ``cuda`` extra).

Importing this package imports ``numba.cuda`` (``numba-cuda``); under
``NUMBA_ENABLE_CUDASIM=1`` every kernel runs in numba's CUDA simulator.

Public pieces (each kernel also has a test-facing wrapper that validates,
allocates and returns device arrays):

* :func:`moe_forward_cuda`, :func:`upload` -- the layer forward
  (``layer.to("cuda")``, ``layer(x, device="cuda")``);
* :func:`topk_route` -- :func:`numba_moe.route` on the device;
* :func:`plan_device` -- BucketPlan + moe_align_block_size on the device;
* :func:`expert_gemm` -- the grouped quantized GEMMs (GEMV and tiled: integer
  ``dp4a`` GEMV and tensor-core kernel for quantized weights, float kernels for dense);
* :func:`combine` -- the weighted combine.
"""
from .combine import combine
from .forward import CudaMoE, moe_forward_cuda, upload
from .matmul import expert_gemm
from .plan import DevicePlan, plan_device
from .routing import topk_route

__all__ = ["moe_forward_cuda", "upload", "CudaMoE", "topk_route", "plan_device",
           "DevicePlan", "expert_gemm", "combine"]

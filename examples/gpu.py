"""The same layer on an NVIDIA GPU, with numpy, numba, CuPy or torch arrays.

``layer.to("cuda")`` uploads the raw quantized blocks once; ``layer(x,
device="cuda")`` then runs router, top-k, planning, the expert GEMMs and the
combine on the GPU with no host round trip.  numpy input is copied in and
the result copied back; any ``__cuda_array_interface__`` array (numba,
CuPy, torch) is read in place and the result stays on the device.

    pip install -e ".[cuda]"
    python examples/gpu.py [--gguf model.gguf --layer N --tokens T]

Without a GPU it says so and exits (set NUMBA_ENABLE_CUDASIM=1 to run it in
numba's CUDA simulator: slow, for small models only).
"""
import argparse
import sys

import numpy as np

import numba_moe as nm
from numba_moe.default_model import default_model_path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()

    try:
        from numba import cuda
    except ImportError:
        print("numba-cuda is not installed: pip install -e '.[cuda]'")
        return 0
    if not cuda.is_available():
        print("no CUDA GPU found (set NUMBA_ENABLE_CUDASIM=1 to use the simulator)")
        return 0

    layer = nm.load_moe_layer(args.gguf or default_model_path(), layer=args.layer).to("cuda")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.tokens, layer.hidden_size), dtype=np.float32)
    cpu = layer(x)
    scale = np.abs(cpu).max()

    # numpy in, numpy out.
    y = layer(x, device="cuda")
    print(f"numpy in/out:      max rel diff vs CPU {np.abs(y - cpu).max() / scale:.2e}")

    # A numba device array: the result stays on the GPU, in ``out`` when one
    # is given (without it, the layer's own output buffer, overwritten by the
    # next call).
    d_x = cuda.to_device(x)
    d_out = cuda.device_array_like(d_x)
    layer(d_x, device="cuda", out=d_out)
    y = d_out.copy_to_host()
    print(f"numba device array: max rel diff vs CPU {np.abs(y - cpu).max() / scale:.2e}")

    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        t_x = torch.from_numpy(x).cuda()
        t_y = torch.as_tensor(layer(t_x, device="cuda"), device="cuda").clone()
        print(f"torch.cuda tensor:  max rel diff vs CPU "
              f"{(t_y.cpu().numpy() - cpu).__abs__().max() / scale:.2e}")
    try:
        import cupy
    except ImportError:
        cupy = None
    if cupy is not None:
        c_y = cupy.asarray(layer(cupy.asarray(x), device="cuda")).copy()
        print(f"CuPy array:         max rel diff vs CPU "
              f"{np.abs(cupy.asnumpy(c_y) - cpu).max() / scale:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

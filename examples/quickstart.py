"""Load one MoE layer, run it, and check it against the reference path.

    python examples/quickstart.py                         # the embedded default model
    python examples/quickstart.py --gguf model.gguf --layer 3 --tokens 32
"""
import argparse

import numpy as np

import numba_moe as nm
from numba_moe.default_model import default_model_path
from numba_moe.reference import moe_forward_reference


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help="a GGUF MoE model (default: the embedded small model)")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()

    layer = nm.load_moe_layer(args.gguf or default_model_path(), layer=args.layer)
    print(layer)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.tokens, layer.hidden_size), dtype=np.float32)

    # Routing alone: which experts each token goes to, and with what weight.
    r = layer.route(x)
    print("token 0 -> experts", r.expert_ids[0].tolist(),
          "weights", np.round(r.expert_weights[0], 3).tolist())

    # The whole layer on the fast CPU path (compressed-block kernels) ...
    y = layer(x)
    # ... and on the slow per-pair reference path (dequantized experts).
    ref = moe_forward_reference(layer, x)
    rel = np.abs(y - ref).max() / np.abs(ref).max()
    print(f"output {y.shape} {y.dtype}; max relative difference vs reference: {rel:.2e}")
    assert rel < 1e-2, rel


if __name__ == "__main__":
    main()

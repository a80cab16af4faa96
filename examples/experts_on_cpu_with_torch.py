"""Experts on the CPU inside a PyTorch model (the ``--cpu-moe`` pattern).

A PyTorch module keeps its dense parts in torch and hands the MoE block to
numba_moe, which reads the expert weights as GGUF k-quant blocks straight
from the file's memory map.  CPU tensors cross the boundary without copies:
``tensor.numpy()`` and ``torch.from_numpy`` share memory.

    python examples/experts_on_cpu_with_torch.py [--gguf model.gguf --layer N]
"""
import argparse

import numpy as np
import torch

import numba_moe as nm
from numba_moe.default_model import default_model_path


class NumbaMoE(torch.nn.Module):
    """An MoE block whose experts run in numba_moe on the CPU.

    Parameters
    ----------
    layer : numba_moe.MoELayer
    """

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden):
        # hidden: float32 [..., H] on the CPU.  .contiguous() is a no-op for
        # the usual layouts; .numpy() shares memory with the tensor.
        flat = hidden.reshape(-1, hidden.shape[-1]).contiguous()
        out = self.layer(flat.detach().numpy())
        return torch.from_numpy(out).reshape(hidden.shape)


class TorchMoE(torch.nn.Module):
    """The same block in plain torch on dequantized weights (for comparison)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.gate = torch.from_numpy(layer.gate.dense())
        self.up = torch.from_numpy(layer.up.dense())
        self.down = torch.from_numpy(layer.down.dense())

    def forward(self, hidden):
        flat = hidden.reshape(-1, hidden.shape[-1])
        r = self.layer.route(flat.contiguous().numpy())
        ids, w = torch.from_numpy(r.expert_ids), torch.from_numpy(r.expert_weights)
        out = torch.zeros_like(flat)
        for k in range(ids.shape[1]):
            for e in ids[:, k].unique().tolist():
                rows = (ids[:, k] == e).nonzero().squeeze(1)
                h = flat[rows]
                act = torch.nn.functional.silu(h @ self.gate[e].T) * (h @ self.up[e].T)
                out[rows] += w[rows, k, None] * (act @ self.down[e].T)
        return out.reshape(hidden.shape)


class Block(torch.nn.Module):
    """A pre-norm residual block: x + MoE(norm(x))."""

    def __init__(self, moe, hidden):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden, elementwise_affine=False)
        self.moe = moe

    def forward(self, x):
        return x + self.moe(self.norm(x))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf")
    ap.add_argument("--layer", type=int, default=0)
    args = ap.parse_args()

    layer = nm.load_moe_layer(args.gguf or default_model_path(), layer=args.layer)
    H = layer.hidden_size
    torch.manual_seed(0)
    x = torch.randn(2, 5, H)  # [batch, sequence, hidden]

    with torch.no_grad():
        fast = Block(NumbaMoE(layer), H)(x)
        slow = Block(TorchMoE(layer), H)(x)
    rel = ((fast - slow).abs().max() / (slow - x).abs().max()).item()
    print(f"numba_moe block vs torch block on dequantized weights: max rel diff {rel:.2e}")
    assert fast.shape == x.shape and rel < 1e-2, rel

    # Zero-copy check: the numpy view handed to numba_moe is the tensor's memory.
    flat = x.reshape(-1, H)
    assert np.shares_memory(flat.numpy(), x.numpy())
    print("ok")


if __name__ == "__main__":
    main()

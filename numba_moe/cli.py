"""The ``numba-moe`` command line: run, inspect, bench, quantize.

Errors in arguments or files print one line on stderr and exit with status
2 (``--debug`` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

__all__ = ["main"]

_EPILOG = """\
examples:
  numba-moe run                                 the embedded default model, 16 tokens
  numba-moe run --gguf model.gguf --layer 3 --tokens 64
  numba-moe inspect model.gguf                  archs, shapes, types, routing defaults
  numba-moe bench --shape qwen3-30b-a3b         the speed table (ours vs numpy vs floor)
  numba-moe quantize f32.gguf q4km.gguf --type Q4_K_M
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="numba-moe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mixture-of-Experts layers of GGUF models on Numba CPU/GPU kernels.",
        epilog=_EPILOG)
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    r = sub.add_parser("run", help="run one MoE layer on random hidden states",
                       description="Load one MoE layer (default: the embedded small "
                       "Qwen3-MoE-shaped Q4_K_M model), run it on random hidden states, "
                       "compare with the reference path and report the speed.")
    r.add_argument("--gguf", metavar="FILE", help="GGUF model file (default: embedded model)")
    r.add_argument("--layer", type=int, default=None, metavar="N",
                   help="block index (default: the first MoE layer)")
    r.add_argument("--tokens", type=int, default=16, metavar="T", help="tokens per call (16)")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    r.add_argument("--repeat", type=int, default=20, metavar="R", help="timed calls (20)")
    r.add_argument("--seed", type=int, default=0)

    i = sub.add_parser("inspect", help="describe the MoE layers of a GGUF file")
    i.add_argument("file", metavar="FILE")

    b = sub.add_parser("bench", help="benchmark table: ours vs numpy vs the memory floor")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--gguf", metavar="FILE", help="benchmark a layer of this file")
    src.add_argument("--shape", choices=("qwen3-30b-a3b", "default"), default="default",
                     help="a synthetic layer: the real Qwen3-30B-A3B shape (about 390 MB, "
                     "written to a temporary file) or the embedded default model")
    b.add_argument("--layer", type=int, default=None, metavar="N")
    b.add_argument("--tokens", default="1,4,16,64,512", metavar="T,T,...")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu")

    q = sub.add_parser("quantize", help="rewrite a float GGUF's expert tensors as k-quants",
                       description="Quantize the stacked expert tensors (ffn_*_exps, "
                       "ffn_*_shexp) of a float GGUF; every other tensor and all metadata "
                       "are copied untouched.  Q4_K_M / Q5_K_M follow llama.cpp's rule for "
                       "which down projections get Q6_K.")
    q.add_argument("input", metavar="IN")
    q.add_argument("output", metavar="OUT")
    q.add_argument("--type", required=True, choices=("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"))
    return p


def _first_moe_layer(path) -> int:
    from .gguf_io import GGUFFile

    f = GGUFFile(path)
    for name in f.tensor_names():
        if name.endswith(("ffn_gate_exps.weight", "ffn_gate_up_exps.weight")):
            return int(name.split(".")[1])
    from .errors import GGUFError

    raise GGUFError(f"{path}: no MoE layer (no blk.N.ffn_gate_exps.weight tensor)")


def _load(args):
    import numba_moe as nm
    from .default_model import default_model_path

    path = args.gguf or default_model_path(announce=True)
    layer = args.layer if args.layer is not None else _first_moe_layer(path)
    return nm.load_moe_layer(path, layer), path


def _cmd_run(args) -> int:
    from .errors import MoEError
    from .reference import moe_forward_reference
    from .cpu.forward import touched_expert_bytes

    if args.tokens < 1 or args.repeat < 1:
        raise MoEError("--tokens and --repeat must be >= 1")
    layer, path = _load(args)
    print(f"model   {path}")
    print(f"layer   {layer}")
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.tokens, layer.hidden_size), dtype=np.float32)
    r = layer.route(x)
    counts = np.bincount(r.expert_ids.ravel(), minlength=layer.num_experts)
    print(f"routing {args.tokens} tokens x top-{layer.top_k}: "
          f"{int((counts > 0).sum())}/{layer.num_experts} experts used")
    width = max(1, 40 // max(1, counts.max()))
    for e in np.argsort(-counts, kind="stable")[:min(16, layer.num_experts)]:
        if counts[e]:
            print(f"  expert {e:4d} {counts[e]:5d} {'#' * min(60, counts[e] * width)}")
    print("first call: compiling the Numba kernels (tens of seconds, once; cached on disk "
          "afterwards) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    y = layer(x, device=args.device)
    first = time.perf_counter() - t0
    y = np.asarray(y.copy_to_host() if hasattr(y, "copy_to_host") else y)
    ref = moe_forward_reference(layer, x)
    diff = float(np.max(np.abs(y - ref)))
    scale = float(np.max(np.abs(ref))) or 1.0
    print(f"check   max |fast - reference| = {diff:.3g} (relative {diff / scale:.3g})")
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        layer(x, device=args.device)
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    gb = touched_expert_bytes(layer, r.expert_ids) / t / 1e9
    print(f"first call {first * 1e3:.1f} ms (includes compilation or cache load)")
    print(f"time    {t * 1e3:.3f} ms/call (median of {args.repeat}), "
          f"{args.tokens / t:,.0f} tokens/s, {gb:.2f} GB/s of expert blocks")
    return 0


def _cmd_inspect(args) -> int:
    import gguf

    from .gguf_io import GGUFFile
    from .layer import load_moe_layer
    from .quants import NATIVE_TYPES

    f = GGUFFile(args.file)
    print(f"file          {f.path}")
    print(f"architecture  {f.arch}")
    blocks = sorted({int(n.split(".")[1]) for n in f.tensor_names()
                     if n.startswith("blk.") and n.endswith(("ffn_gate_exps.weight",
                                                            "ffn_gate_up_exps.weight"))})
    print(f"MoE layers    {len(blocks)}: {_ranges(blocks) or 'none'}")
    if not blocks:
        return 0
    layer = load_moe_layer(f.path, blocks[0])
    print(f"experts       E={layer.num_experts}, top-K={layer.top_k}, "
          f"H={layer.hidden_size}, I={layer.expert_intermediate}")
    print(f"routing       gating={layer.gating}, norm_topk_prob={layer.norm_topk_prob}, "
          f"groups={layer.n_group}/{layer.topk_group}, scale={layer.routed_scale}, "
          f"selection bias={'yes' if layer.selection_bias is not None else 'no'}")
    if layer.shared is not None:
        kind = "sigmoid-gated" if layer.shared.gate_inp is not None else "unscaled"
        print(f"shared expert I={layer.shared.gate.rows} ({kind})")
    print()
    print(f"{'tensor':44s} {'type':7s} {'shape':>22s} {'MiB':>9s}  path")
    slow = 0
    for name in f.tensor_names():
        if "_exps" not in name and "_shexp" not in name:
            continue
        q = f.tensor_qtype(name)
        shape = "x".join(str(d) for d in f.tensor_shape(name))
        nbytes = f.tensor(name).n_bytes
        native = q in NATIVE_TYPES or q == gguf.GGMLQuantizationType.F32
        slow += not native and name.endswith("weight") and f.tensor_shape(name)[-1] > 1
        path = "native" if native else "SLOW: dequantized to float32 on first use"
        if len(f.tensor_shape(name)) == 1:
            path = "float32"
        print(f"{name:44s} {q.name:7s} {shape:>22s} {nbytes / 2**20:9.2f}  {path}")
    if slow:
        print(f"\n{slow} tensor(s) take the slow fallback path")
    return 0


def _ranges(xs):
    out, start = [], None
    for i, v in enumerate(xs):
        if start is None:
            start = v
        if i + 1 == len(xs) or xs[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


def _cmd_bench(args) -> int:
    from .bench import run_cli_bench

    return run_cli_bench(args)


def _cmd_quantize(args) -> int:
    from .requant import quantize_file

    quantize_file(args.input, args.output, args.type)
    return 0


_COMMANDS = {"run": _cmd_run, "inspect": _cmd_inspect, "bench": _cmd_bench,
             "quantize": _cmd_quantize}


def main(argv=None) -> int:
    """Entry point of the ``numba-moe`` console script."""
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except BrokenPipeError:
        # The reader of our stdout went away (``numba-moe inspect f | head``):
        # stop quietly, and keep Python from complaining again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError, ImportError) as exc:
        if args.debug:
            raise
        print(f"numba-moe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

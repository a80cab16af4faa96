"""Seeded fuzzing of the loader (and the forward pass) with corrupted GGUF files.

Every case takes a small, valid model file from the writer, corrupts it in
one of several ways, then loads it and (when it loads) routes and runs one
forward pass.  The allowed outcomes are a clear exception
(:class:`~numba_moe.errors.GGUFError` / :class:`~numba_moe.errors.MoEError`)
or a loaded layer whose outputs have the right shape and dtype (any values:
corrupt weights may give NaN or Inf, which propagate).  Anything else --
another exception type, a crash, a hang -- is a bug.

Mutations (:func:`mutate`), picked per case from a seed:

* ``truncate``: cut the file at a random byte (half the time inside the header);
* ``bitflip``: flip 1-4 random bits of the header;
* ``byte``: set 1-3 random header bytes to random values;
* ``field``: overwrite one structural header field (a count, a string or array
  length, a value type, a tensor's dimension count, dimensions, type or
  offset) with an "interesting" value (0, 1, -1, 2**31, 2**32, 2**63,
  the file size, ...);
* ``shift``: delete or insert 1-8 bytes inside the header (everything after
  it moves);
* ``splice``: copy a random run of header bytes over another place of the header;
* ``data``: overwrite random bytes of the tensor data;
* ``scales``: write fp16 inf / NaN / 65504 over block scales of the data.

The CI test runs a bounded number of cases in-process.  A larger campaign
runs each batch of cases in a subprocess, so that a segfault or a hang is
seen (by return code or timeout) instead of killing the runner::

    python tests/test_fuzz.py --cases 2000 --batch 100 --timeout 300

prints the outcome counts and the case ids of every crash or hang.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import struct
import subprocess
import sys
import tempfile
import warnings

import gguf
import numpy as np
import pytest

import numba_moe as nm
from numba_moe.errors import GGUFError, MoEError

# Two base models covering both loader paths: plain softmax routing with
# Q4_K/Q6_K, and deepseek2 with groups, selection bias, a shared expert,
# Q5_K/Q8_0 and a fused gate/up tensor.
BASES = {
    "qwen3moe": dict(arch="qwen3moe", hidden_size=256, expert_intermediate=256, num_experts=4,
                     top_k=2),
    "deepseek2": dict(arch="deepseek2", hidden_size=256, expert_intermediate=256, num_experts=4,
                      top_k=2, gate_type="Q5_K", up_type="Q5_K", down_type="Q8_0",
                      fused_gate_up=True, gating_func="sigmoid", n_group=2, topk_group=1,
                      norm_topk_prob=True, weights_scale=2.0),
}
MUTATIONS = ("truncate", "bitflip", "byte", "field", "shift", "splice", "data", "scales")
# Values a corrupt field is set to, besides ones derived from the file size.
INTERESTING = (0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 255, 256, 2**15, 2**16 - 1, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)
FUZZ_TOKENS = 3
CI_CASES = 1500


class BaseFile:
    """A valid model file and the byte ranges of its header fields."""

    def __init__(self, path: str):
        self.path = path
        self.data = open(path, "rb").read()
        r = gguf.GGUFReader(path)
        base = r.data.ctypes.data
        self.header_end = int(r.data_offset)
        # (offset, nbytes) of every fixed-size integer in the header: counts,
        # string and array lengths, value types, dims, tensor types and offsets.
        fields = []
        for f in list(r.fields.values()) + [t.field for t in r.tensors]:
            for part in f.parts:
                if part.dtype.kind in "iu" and part.dtype.itemsize in (4, 8):
                    off = int(part.ctypes.data - base)
                    for j in range(part.size):
                        fields.append((off + j * part.dtype.itemsize, part.dtype.itemsize))
        self.fields = fields
        # Byte offsets of the fp16 block scales of every native expert tensor.
        self.scales = []
        for t in r.tensors:
            block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            at = {gguf.GGMLQuantizationType.Q4_K: (0, 2), gguf.GGMLQuantizationType.Q5_K: (0, 2),
                  gguf.GGMLQuantizationType.Q6_K: (208,),
                  gguf.GGMLQuantizationType.Q8_0: (0,)}.get(t.tensor_type)
            if at:
                self.scales.append((int(t.data_offset), int(t.n_bytes), size, at))


def mutate(base: BaseFile, rng: np.random.Generator):
    """One corrupted copy of ``base``: ``(mutation name, bytes)``."""
    kind = MUTATIONS[rng.integers(len(MUTATIONS))]
    b = bytearray(base.data)
    size = len(b)
    if kind == "truncate":
        hi = base.header_end if rng.random() < 0.5 else size
        return kind, bytes(b[:rng.integers(0, hi)])
    if kind == "bitflip":
        for _ in range(rng.integers(1, 5)):
            i = rng.integers(0, base.header_end)
            b[i] ^= 1 << int(rng.integers(8))
    elif kind == "byte":
        for _ in range(rng.integers(1, 4)):
            b[rng.integers(0, base.header_end)] = int(rng.integers(256))
    elif kind == "field":
        off, n = base.fields[rng.integers(len(base.fields))]
        (old,) = struct.unpack_from("<I" if n == 4 else "<Q", b, off)
        choices = INTERESTING + (size, size - base.header_end, old + 1, old - 1, old * 2,
                                 old ^ (1 << int(rng.integers(8 * n))))
        v = int(choices[rng.integers(len(choices))]) % (1 << (8 * n))
        struct.pack_into("<I" if n == 4 else "<Q", b, off, v)
    elif kind == "shift":
        i = int(rng.integers(0, base.header_end))
        n = int(rng.integers(1, 9))
        if rng.random() < 0.5:
            del b[i:i + n]
        else:
            b[i:i] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif kind == "splice":
        n = int(rng.integers(1, 33))
        src, dst = (int(v) for v in rng.integers(0, base.header_end - n, 2))
        b[dst:dst + n] = b[src:src + n]
    elif kind == "data":
        for _ in range(rng.integers(1, 9)):
            b[rng.integers(base.header_end, size)] = int(rng.integers(256))
    else:
        start, nbytes, bsize, offs = base.scales[rng.integers(len(base.scales))]
        for _ in range(rng.integers(1, 4)):
            blk = start + bsize * int(rng.integers(nbytes // bsize))
            val = (0x7C00, 0xFC00, 0x7E00, 0x7BFF, 0xFBFF)[rng.integers(5)]
            struct.pack_into("<H", b, blk + offs[rng.integers(len(offs))], val)
    return kind, bytes(b)


def run_case(path: str, x: np.ndarray) -> str:
    """Load ``path`` and run the layer; returns the outcome name.

    ``'GGUFError'`` / ``'MoEError'`` (clear errors), ``'ok'`` (loaded, ran,
    outputs all finite), ``'ok-nonfinite'`` (loaded, ran, some NaN/Inf), or
    ``'escaped:<type>: <message>'`` for any other exception or a wrong output.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = nm.load_moe_layer(path, layer=0)
            # a corrupt file that loads still has consistent shapes, but be safe
            xx = np.ascontiguousarray(np.resize(x, (x.shape[0], layer.hidden_size)))
            ids, w = layer.route(xx)
            if ids.shape != (x.shape[0], layer.top_k) or \
                    ids.min() < 0 or ids.max() >= layer.num_experts:
                return f"escaped:bad-route: ids {ids.tolist()}"
            y = layer(xx)
            if y.shape != xx.shape or y.dtype != np.float32:
                return f"escaped:bad-output: {y.shape} {y.dtype}"
            finite = bool(np.isfinite(w).all() and np.isfinite(y).all())
    except GGUFError:
        return "GGUFError"
    except MoEError:
        return "MoEError"
    except Exception as exc:  # the bug this test looks for
        return f"escaped:{type(exc).__name__}: {str(exc)[:200]}"
    return "ok" if finite else "ok-nonfinite"


def make_bases(directory: str):
    """Write the base files into ``directory``; returns {name: BaseFile}."""
    return {name: BaseFile(nm.write_moe_gguf(os.path.join(directory, name + ".gguf"), seed=7,
                                             **kw))
            for name, kw in BASES.items()}


def case(bases, seed: int, i: int):
    """Case ``i`` of campaign ``seed``: ``(base name, mutation, bytes)``."""
    rng = np.random.default_rng([seed, i])
    names = sorted(bases)
    name = names[rng.integers(len(names))]
    kind, data = mutate(bases[name], rng)
    return name, kind, data


def _inputs():
    return np.random.default_rng(1).standard_normal((FUZZ_TOKENS, 256)).astype(np.float32)


# --------------------------------------------------------------------------
# CI test
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return make_bases(str(tmp_path_factory.mktemp("fuzz")))


def test_base_files_load_and_run(bases, tmp_path):
    x = _inputs()
    for name, base in bases.items():
        assert run_case(base.path, x) == "ok", name


def test_fuzz_corrupt_files(bases, tmp_path):
    x = _inputs()
    counts = collections.Counter()
    bad = []
    path = str(tmp_path / "case.gguf")
    for i in range(CI_CASES):
        name, kind, data = case(bases, 0, i)
        with open(path, "wb") as fh:
            fh.write(data)
        outcome = run_case(path, x)
        counts[outcome if not outcome.startswith("escaped") else "escaped"] += 1
        if outcome.startswith("escaped"):
            bad.append((i, name, kind, outcome))
    assert not bad, f"{len(bad)} cases escaped: {bad[:5]}"
    # The campaign must exercise both sides: clear errors and loadable files.
    assert counts["GGUFError"] > CI_CASES // 4
    assert counts["ok"] + counts["ok-nonfinite"] > CI_CASES // 10


# --------------------------------------------------------------------------
# subprocess campaign
# --------------------------------------------------------------------------

def _worker(args) -> int:
    """Run cases ``[start, stop)``, one JSON line before and after each."""
    bases = make_bases(args.dir)
    x = _inputs()
    path = os.path.join(args.dir, f"case_{os.getpid()}.gguf")
    with open(args.log, "a") as log:
        for i in range(args.start, args.stop):
            name, kind, data = case(bases, args.seed, i)
            log.write(json.dumps({"start": i, "base": name, "kind": kind}) + "\n")
            log.flush()
            with open(path, "wb") as fh:
                fh.write(data)
            log.write(json.dumps({"done": i, "outcome": run_case(path, x)}) + "\n")
            log.flush()
    return 0


def _campaign(args) -> int:
    """Run ``args.cases`` cases in subprocess batches; print outcome counts."""
    results = {}
    started = {}
    with tempfile.TemporaryDirectory() as d:
        log = os.path.join(d, "log.jsonl")
        i = 0
        while i < args.cases:
            stop = min(i + args.batch, args.cases)
            cmd = [sys.executable, __file__, "--worker", "--start", str(i), "--stop", str(stop),
                   "--seed", str(args.seed), "--dir", d, "--log", log]
            try:
                rc = subprocess.run(cmd, timeout=args.timeout).returncode
                hung = False
            except subprocess.TimeoutExpired:
                rc, hung = None, True
            for line in open(log):
                rec = json.loads(line)
                if "start" in rec:
                    started[rec["start"]] = rec
                else:
                    results[rec["done"]] = rec["outcome"]
            open(log, "w").close()
            unfinished = [j for j in range(i, stop) if j not in results and j in started]
            if unfinished:
                j = unfinished[0]
                results[j] = "hang" if hung else f"crash:rc={rc}"
                i = j + 1
            else:
                if rc not in (0, None):
                    print(f"worker for [{i}, {stop}) exited with {rc} outside a case")
                i = stop
    counts = collections.Counter(
        r.split(":")[0] + (":" + r.split(":")[1] if r.startswith("escaped") else "")
        for r in results.values())
    print(f"{len(results)} cases, seed {args.seed}")
    by_kind = collections.defaultdict(collections.Counter)
    for j, r in results.items():
        by_kind[started[j]["kind"]][r.split(":")[0]] += 1
    for outcome, n in counts.most_common():
        print(f"  {outcome:<40} {n}")
    print("by mutation:")
    for kind, c in sorted(by_kind.items()):
        print(f"  {kind:<10} " + ", ".join(f"{k} {v}" for k, v in c.most_common()))
    for j in sorted(results):
        r = results[j]
        if not (r in ("GGUFError", "MoEError") or r.startswith("ok")):
            print(f"  case {j} ({started[j]['base']}, {started[j]['kind']}): {r}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=2000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per batch")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, help=argparse.SUPPRESS)
    p.add_argument("--stop", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--log", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return _worker(args) if args.worker else _campaign(args)


if __name__ == "__main__":
    sys.exit(main())

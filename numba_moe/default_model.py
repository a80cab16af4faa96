"""The embedded default model: a small Qwen3-MoE-shaped Q4_K_M layer.

It is written with :func:`numba_moe.write_moe_gguf` on first use into the
cache directory (``NUMBA_MOE_CACHE_DIR``, default ``~/.cache/numba_moe``) and
reused afterwards, so ``numba-moe run`` works with no download and no
arguments.  Shapes keep Qwen3-30B-A3B's proportions at a size that loads in
milliseconds: H=768, I=256, E=16, K=4, gate/up Q4_K, down Q6_K (about 6 MB).
"""
from __future__ import annotations

import os
import sys
import tempfile

from .config import get_config
from .writer import write_moe_gguf

__all__ = ["DEFAULT_MODEL", "default_model_path"]

#: Writer arguments of the default model; the file name carries a version so
#: a change here never reuses a stale file.
DEFAULT_MODEL = dict(arch="qwen3moe", num_layers=1, hidden_size=768, expert_intermediate=256,
                     num_experts=16, top_k=4, gate_type="Q4_K", up_type="Q4_K",
                     down_type="Q6_K", init="quantize", seed=2026)
_FILE = "default-qwen3moe-q4km-v1.gguf"


def default_model_path(announce: bool = False) -> str:
    """Path of the default model file, writing it first if it is not there yet.

    The file is written under a temporary name and renamed into place, so
    concurrent first uses never see a half-written file.

    Parameters
    ----------
    announce : bool
        Say on stderr when the file is being written (it takes seconds: the
        quantizers compile on first use).
    """
    folder = get_config().cache_dir
    path = os.path.join(folder, _FILE)
    if not os.path.isfile(path):
        if announce:
            print(f"writing the default model to {path} (first use) ...", file=sys.stderr,
                  flush=True)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".gguf.part")
        os.close(fd)
        try:
            write_moe_gguf(tmp, **DEFAULT_MODEL)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path

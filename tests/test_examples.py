"""The examples run, so they cannot rot."""
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def run_example(name, tmp_path, extra_env=None, args=()):
    env = dict(os.environ)
    env["NUMBA_MOE_CACHE_DIR"] = str(tmp_path)
    env.update(extra_env or {})
    p = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("example_cache")


def test_quickstart(cache):
    out = run_example("quickstart.py", cache)
    assert "max relative difference vs reference" in out


def test_experts_on_cpu_with_torch(cache):
    pytest.importorskip("torch")
    out = run_example("experts_on_cpu_with_torch.py", cache)
    assert "numba_moe block vs torch block" in out and out.strip().endswith("ok")


def test_gpu_example_under_simulator(cache, make_model):
    """gpu.py on a small model in numba-cuda's simulator (on a GPU machine it
    runs for real: ``python examples/gpu.py``)."""
    pytest.importorskip("numba_cuda")
    path = make_model("gpu_example", arch="qwen3moe")
    out = run_example("gpu.py", cache, {"NUMBA_ENABLE_CUDASIM": "1"},
                      ("--gguf", path, "--tokens", "3"))
    lines = [ln for ln in out.splitlines() if "max rel diff vs CPU" in ln]
    assert len(lines) >= 2, out
    for ln in lines:
        assert float(ln.split()[-1]) < 1e-2, ln

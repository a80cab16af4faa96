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

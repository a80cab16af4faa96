"""Every ``numba-moe`` subcommand, run as a user would: in a subprocess."""
import os
import subprocess
import sys

import pytest

import numba_moe as nm

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    env = dict(os.environ)
    env["NUMBA_MOE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    return env


def cli(env, *args, ok=True):
    p = subprocess.run([sys.executable, "-m", "numba_moe.cli", *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=600)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def test_help_teaches(cli_env):
    out = cli(cli_env, "--help").stdout
    for word in ("run", "inspect", "bench", "quantize", "examples:"):
        assert word in out
    assert "--tokens" in cli(cli_env, "run", "--help").stdout


def test_run_default_model(cli_env):
    out = cli(cli_env, "run", "--tokens", "5", "--repeat", "2").stdout
    assert "default-qwen3moe" in out
    assert "routing 5 tokens x top-4" in out
    assert "max |fast - reference|" in out and "ms/call" in out and "GB/s" in out
    rel = float(out.split("(relative ")[1].split(")")[0])
    assert rel < 5e-3


def test_run_file_and_layer(cli_env, make_model):
    path = make_model("qwen2moe", arch="qwen2moe")
    out = cli(cli_env, "run", "--gguf", path, "--layer", "0", "--tokens", "3",
              "--repeat", "1").stdout
    assert "qwen2moe" in out and "shared expert" in out


def test_inspect(cli_env, make_model):
    path = make_model("mixed_q4_0", arch="olmoe", gate_type="Q4_0")
    out = cli(cli_env, "inspect", path).stdout
    assert "architecture  olmoe" in out
    assert "E=8, top-K=2, H=256, I=256" in out
    assert "blk.0.ffn_gate_exps.weight" in out and "Q4_0" in out
    assert "SLOW" in out and "1 tensor(s) take the slow fallback path" in out


def test_quantize_q4_k_m(cli_env, make_model, tmp_path):
    src = make_model("float_experts", arch="qwen3moe", num_layers=8, gate_type="F32",
                     up_type="F16", down_type="F32")
    dst = tmp_path / "q.gguf"
    p = cli(cli_env, "quantize", src, dst, "--type", "Q4_K_M")
    assert "quantize" in p.stderr  # the progress bar
    out = cli(cli_env, "inspect", dst).stdout
    assert "Q6_K" in out and "Q4_K" in out and "F16" not in out
    # llama.cpp's use_more_bits(i, 8): i < 1, i >= 7, or (i - 1) % 3 == 2.
    got = {i: nm.load_moe_layer(dst, i).down.qtype.name for i in range(8)}
    assert got == {0: "Q6_K", 1: "Q4_K", 2: "Q4_K", 3: "Q6_K", 4: "Q4_K", 5: "Q4_K",
                   6: "Q6_K", 7: "Q6_K"}
    layer = nm.load_moe_layer(dst, 1)
    assert layer.gate.qtype.name == "Q4_K" and layer.up.qtype.name == "Q4_K"


def test_bench_table(cli_env):
    out = cli(cli_env, "bench", "--tokens", "1,3").stdout
    assert "| layer | types |" in out
    assert out.count("| qwen3moe E16 K4 H768 I256 |") == 2


@pytest.mark.parametrize("args", [
    ("run", "--gguf", "{bad}"),
    ("inspect", "{bad}"),
    ("inspect", "{missing}"),
    ("quantize", "{bad}", "{out}", "--type", "Q4_K_M"),
    ("run", "--tokens", "0"),
    ("bench", "--tokens", "a,b"),
])
def test_bad_input_is_one_line(cli_env, tmp_path, args):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(64))
    fill = dict(bad=bad, missing=tmp_path / "missing.gguf", out=tmp_path / "o.gguf")
    p = cli(cli_env, *[a.format(**fill) for a in args], ok=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_debug_shows_traceback(cli_env, tmp_path):
    p = cli(cli_env, "--debug", "inspect", tmp_path / "missing.gguf", ok=False)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_bad_choice_is_argparse_error(cli_env):
    p = cli(cli_env, "quantize", "a", "b", "--type", "Q3_K", ok=False)
    assert p.returncode == 2 and "invalid choice" in p.stderr

"""Memory: loading maps experts without copying them; calls and reloads do not leak.

Resident memory is read from ``/proc/self/status`` (Linux): ``RssAnon``
(heap, numpy buffers) and ``RssFile`` (pages of mapped files, such as the
GGUF map).  Thresholds are a few MiB against files of ~120 MiB, so allocator
noise cannot pass for a copy and a copy cannot pass for noise.
"""
import gc
import os

import numpy as np
import pytest

import numba_moe as nm

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"),
                                reason="needs Linux /proc")

MiB = 2**20


def _rss():
    """(anon, file) resident bytes of this process."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                fields[key] = int(rest.split()[0]) * 1024
    return fields["RssAnon"], fields["RssFile"]


def _maps_of(path):
    with open("/proc/self/maps") as fh:
        return sum(1 for line in fh if line.rstrip().endswith(os.path.realpath(path)))


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """A 125 MiB layer: E=128, H=1024, I=512, Q4_K/Q4_K/Q6_K random blocks."""
    path = str(tmp_path_factory.mktemp("mem") / "big.gguf")
    nm.write_moe_gguf(path, hidden_size=1024, expert_intermediate=512, num_experts=128,
                      top_k=4, init="random_blocks", seed=1)
    gc.collect()
    return path


def test_load_does_not_copy_experts(big_model):
    size = os.path.getsize(big_model)
    assert size > 100 * MiB
    nm.load_moe_layer(big_model)              # first load: imports, gguf-py caches
    gc.collect()
    anon0, file0 = _rss()
    layer = nm.load_moe_layer(big_model)
    anon1, file1 = _rss()
    expert_bytes = sum(t.nbytes for t in layer.expert_tensors)
    assert expert_bytes > 0.95 * size
    # the router (E*H float32 = 512 KiB) is the only copy; allow header parsing noise
    assert anon1 - anon0 < 8 * MiB, f"anonymous memory grew {(anon1 - anon0) / MiB:.1f} MiB"
    assert file1 - file0 < 8 * MiB, f"mapped file pages grew {(file1 - file0) / MiB:.1f} MiB"
    for t in layer.expert_tensors:
        assert not t.data.flags.owndata and np.shares_memory(t.data, layer._file.reader.data)


def test_repeated_forward_does_not_grow_memory(make_model):
    layer = nm.load_moe_layer(make_model("qwen3moe", arch="qwen3moe"))
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((t, 256)).astype(np.float32) for t in (1, 7, 64, 3)]
    for x in xs * 3:                          # warm-up: compile, grow the workspace
        layer(x)
        layer.route(x)
    gc.collect()
    anon0, _ = _rss()
    for _ in range(100):
        for x in xs:
            layer(x)
            layer.route(x)
    gc.collect()
    anon1, _ = _rss()
    grew = (anon1 - anon0) / MiB
    assert anon1 - anon0 < 4 * MiB, f"400 forwards grew anonymous memory {grew:.1f} MiB"


def test_dropping_a_layer_releases_its_map(make_model):
    path = make_model("qwen3moe", arch="qwen3moe")
    x = np.random.default_rng(2).standard_normal((5, 256)).astype(np.float32)
    gc.collect()
    before = _maps_of(path)
    anon0 = None
    for i in range(30):
        layer = nm.load_moe_layer(path)
        layer(x)
        del layer
        gc.collect()
        if i == 4:
            anon0, _ = _rss()
    assert _maps_of(path) == before
    anon1, _ = _rss()
    assert anon1 - anon0 < 4 * MiB

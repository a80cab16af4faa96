"""Shared fixtures: small synthetic model files written once per session."""
import os

import pytest

import numba_moe as nm

# Small but block-aligned shapes: H and I are multiples of 256 so every
# k-quant type can store gate/up (rows along H) and down (rows along I).
SMALL = dict(hidden_size=256, expert_intermediate=256, num_experts=8, top_k=2)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def make_model(model_dir):
    """``make_model(name, **writer_kwargs) -> path``, cached per name."""
    made = {}

    def make(name, **kw):
        if name not in made:
            args = dict(SMALL)
            args.update(kw)
            made[name] = nm.write_moe_gguf(os.path.join(model_dir, name + ".gguf"), **args)
        return made[name]

    return make

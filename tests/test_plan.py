"""BucketPlan, moe_align_block_size and pick_block_size against slow references."""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numba_moe as nm
from numba_moe import config
from numba_moe.errors import MoEError


# --------------------------------------------------------------------------
# references: plain Python loops
# --------------------------------------------------------------------------

def ref_plan(ids, weights, num_experts):
    n_tok, k = ids.shape
    flat = [int(v) for v in ids.ravel()]
    pairs_of = [[p for p in range(len(flat)) if flat[p] == e] for e in range(num_experts)]
    offsets = [0]
    for e in range(num_experts):
        offsets.append(offsets[-1] + len(pairs_of[e]))
    packed = [0] * len(flat)
    by_token = [0] * len(flat)
    of_slot = [0] * len(flat)
    for e in range(num_experts):
        for j, p in enumerate(pairs_of[e]):
            slot = offsets[e] + j
            packed[slot] = p // k
            by_token[p] = slot
            of_slot[slot] = p
    return offsets, packed, by_token, of_slot, weights.astype(np.float32).ravel()


def ref_align(ids, num_experts, block_size):
    flat = [int(v) for v in np.ravel(ids)]
    sentinel = len(flat)
    sorted_ids, blocks = [], []
    for e in range(num_experts):
        run = [p for p in range(len(flat)) if flat[p] == e]
        if not run:
            continue
        n_blocks = -(-len(run) // block_size)
        sorted_ids += run + [sentinel] * (n_blocks * block_size - len(run))
        blocks += [e] * n_blocks
    return sorted_ids, blocks, len(sorted_ids)


def ref_pick(counts, total):
    if total == 0:
        return 16
    for bs in (64, 32, 16):
        padded = sum(-(-int(c) // bs) * bs for c in counts)
        if padded <= 1.3 * total + 1e-9:
            return bs
    return 16


def random_routing(rng, n_tok, k, num_experts, distinct=True, skew=False):
    if distinct:
        ids = np.argsort(rng.random((n_tok, num_experts)), axis=1)[:, :k]
    elif skew:
        ids = np.minimum(rng.geometric(0.3, size=(n_tok, k)) - 1, num_experts - 1)
    else:
        ids = rng.integers(0, num_experts, size=(n_tok, k))
    weights = rng.random((n_tok, k)).astype(np.float32) + 0.01
    return ids.astype(np.int32), weights


def check_plan(plan, ids, weights, num_experts):
    offsets, packed, by_token, of_slot, w = ref_plan(ids, weights, num_experts)
    assert plan.expert_offsets.dtype == np.int64
    assert plan.packed_token_idx.dtype == plan.pairs_by_token.dtype == np.int32
    assert plan.pair_weights.dtype == np.float32
    np.testing.assert_array_equal(plan.expert_offsets, offsets)
    np.testing.assert_array_equal(plan.packed_token_idx, packed)
    np.testing.assert_array_equal(plan.pairs_by_token, by_token)
    np.testing.assert_array_equal(plan.pair_of_slot, of_slot)
    np.testing.assert_array_equal(plan.pair_weights, w)
    np.testing.assert_array_equal(plan.counts, np.diff(offsets))
    assert (plan.num_tokens, plan.top_k, plan.num_experts) == (ids.shape[0], ids.shape[1],
                                                                num_experts)
    assert plan.num_pairs == ids.size


def check_align(got, ids, num_experts, block_size):
    sorted_ids, blocks, total = ref_align(ids, num_experts, block_size)
    assert got.sorted_token_ids.dtype == got.block_expert_ids.dtype == np.int32
    np.testing.assert_array_equal(got.sorted_token_ids, sorted_ids)
    np.testing.assert_array_equal(got.block_expert_ids, blocks)
    assert got.num_tokens_post_padded == total and isinstance(got.num_tokens_post_padded, int)


SHAPES = [(1, 1, 1), (1, 8, 128), (3, 4, 4), (7, 3, 5), (16, 8, 128), (5, 32, 512),
          (64, 8, 64), (2, 16, 16), (33, 6, 60), (100, 2, 512), (9, 32, 32)]


# --------------------------------------------------------------------------
# BucketPlan
# --------------------------------------------------------------------------

def test_build_matches_reference():
    rng = np.random.default_rng(11)
    for n_tok, k, n in SHAPES:
        for distinct, skew in ((True, False), (False, False), (False, True)):
            ids, w = random_routing(rng, n_tok, k, n, distinct=distinct and k <= n, skew=skew)
            plan = nm.BucketPlan.build(ids, w, n)
            check_plan(plan, ids, w, n)
            tokens = plan.packed_token_idx[plan.pairs_by_token].reshape(n_tok, k)
            np.testing.assert_array_equal(tokens, np.repeat(np.arange(n_tok)[:, None], k, 1))
            experts = np.searchsorted(plan.expert_offsets, plan.pairs_by_token, side="right") - 1
            np.testing.assert_array_equal(experts, ids.ravel())


@settings(max_examples=60, deadline=None)
@given(n_tok=st.integers(1, 20), k=st.integers(1, 8), n=st.integers(1, 40),
       seed=st.integers(0, 2**32 - 1), block_size=st.sampled_from(config.BLOCK_SIZES))
def test_plan_and_align_property(n_tok, k, n, seed, block_size):
    rng = np.random.default_rng(seed)
    ids, w = random_routing(rng, n_tok, k, n, distinct=False)
    plan = nm.BucketPlan.build(ids, w, n)
    check_plan(plan, ids, w, n)
    direct = nm.moe_align_block_size(ids, n, block_size)
    check_align(direct, ids, n, block_size)
    via_plan = plan.align(block_size)
    np.testing.assert_array_equal(via_plan.sorted_token_ids, direct.sorted_token_ids)
    np.testing.assert_array_equal(via_plan.block_expert_ids, direct.block_expert_ids)
    assert via_plan.num_tokens_post_padded == direct.num_tokens_post_padded


def test_plan_from_route_output():
    rng = np.random.default_rng(12)
    logits = rng.integers(-3, 4, size=(40, 128)).astype(np.float32)
    r = nm.route(logits, 8)
    plan = nm.BucketPlan.build(*r, 128)
    check_plan(plan, r.expert_ids, r.expert_weights, 128)


def test_other_dtypes_are_converted():
    rng = np.random.default_rng(13)
    ids, w = random_routing(rng, 6, 4, 10)
    a = nm.BucketPlan.build(ids.astype(np.int64), w.astype(np.float64), 10)
    b = nm.BucketPlan.build(ids.astype(np.uint8), w, 10)
    c = nm.BucketPlan.build(np.asfortranarray(ids), np.asfortranarray(w), 10)
    for plan in (a, b, c):
        check_plan(plan, ids, w, 10)


def test_rebuild_reuses_buffers():
    rng = np.random.default_rng(14)
    n, k, max_tok = 64, 4, 32
    plan = nm.BucketPlan.empty(max_tok, k, n)
    assert plan.num_tokens == 0 and plan.packed_token_idx.size == 0
    np.testing.assert_array_equal(plan.expert_offsets, 0)
    offsets_buf = plan.expert_offsets
    base = plan.packed_token_idx.base
    for n_tok in (32, 1, 17, 0, 5, 32):
        ids, w = random_routing(rng, n_tok, k, n)
        plan._packed_buf.fill(-5)
        plan._pairs_buf.fill(-5)
        plan._weights_buf.fill(np.nan)
        assert plan.rebuild(ids, w) is plan
        check_plan(plan, ids, w, n)
        assert plan.expert_offsets is offsets_buf
        assert plan.packed_token_idx.base is base
    with pytest.raises(MoEError, match="max_tokens"):
        plan.rebuild(*random_routing(rng, 33, k, n))
    with pytest.raises(MoEError, match="top_k"):
        plan.rebuild(*random_routing(rng, 3, k + 1, n))


@pytest.mark.parametrize("bad, where", [(-1, "[2, 1]"), (10, "[2, 1]"), (2**32, "[2, 1]")])
def test_out_of_range_ids_are_named(bad, where):
    ids = np.arange(12, dtype=np.int64).reshape(4, 3) % 10
    ids[2, 1] = bad
    ids[3, 2] = -3   # only the first bad position is reported
    w = np.ones((4, 3), dtype=np.float32)
    with pytest.raises(MoEError, match=rf"expert_ids\{where[:-1]}\] = {bad} .*\[0, 10\)"):
        nm.BucketPlan.build(ids, w, 10)
    with pytest.raises(MoEError, match="expert_ids"):
        nm.BucketPlan.empty(4, 3, 10).rebuild(ids, w)
    with pytest.raises(MoEError, match="expert_ids"):
        nm.moe_align_block_size(ids, 10, 16)


@pytest.mark.parametrize("ids, w, n, match", [
    (np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32), 4, "expert_ids"),
    (np.zeros(6, np.int32), np.ones(6, np.float32), 4, "expert_ids"),
    (np.zeros((2, 0), np.int32), np.ones((2, 0), np.float32), 4, "expert_ids"),
    (np.zeros((2, 3), np.int32), np.ones((3, 2), np.float32), 4, "expert_weights"),
    (np.zeros((2, 3), np.int32), np.ones((2, 3), np.int32), 4, "expert_weights"),
    (np.zeros((2, 3), np.int32), np.ones((2, 3), np.float32), 0, "num_experts"),
])
def test_build_rejects(ids, w, n, match):
    with pytest.raises(MoEError, match=match):
        nm.BucketPlan.build(ids, w, n)


def test_empty_routing():
    plan = nm.BucketPlan.build(np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float32), 8)
    np.testing.assert_array_equal(plan.expert_offsets, 0)
    got = nm.moe_align_block_size(np.zeros((0, 4), np.int32), 8, 16)
    assert got.num_tokens_post_padded == 0 and got.block_expert_ids.size == 0
    assert plan.align(16).num_tokens_post_padded == 0
    assert "num_tokens=0" in repr(plan)


# --------------------------------------------------------------------------
# moe_align_block_size
# --------------------------------------------------------------------------

def test_align_matches_reference():
    rng = np.random.default_rng(15)
    for n_tok, k, n in SHAPES:
        for block_size in config.BLOCK_SIZES:
            ids, w = random_routing(rng, n_tok, k, n, distinct=k <= n)
            got = nm.moe_align_block_size(ids, n, block_size)
            check_align(got, ids, n, block_size)
            assert got.num_tokens_post_padded % block_size == 0
            via_plan = nm.BucketPlan.build(ids, w, n).align(block_size)
            np.testing.assert_array_equal(via_plan.sorted_token_ids, got.sorted_token_ids)
            np.testing.assert_array_equal(via_plan.block_expert_ids, got.block_expert_ids)


def test_align_small_example():
    ids = np.array([[2, 0], [2, 3], [0, 2]], dtype=np.int32)
    got = nm.moe_align_block_size(ids, 5, 8)
    s = 6
    np.testing.assert_array_equal(got.sorted_token_ids,
                                  [1, 4, s, s, s, s, s, s, 0, 2, 5, s, s, s, s, s,
                                   3, s, s, s, s, s, s, s])
    np.testing.assert_array_equal(got.block_expert_ids, [0, 2, 3])
    assert got.num_tokens_post_padded == 24
    flat = nm.moe_align_block_size(ids.ravel().astype(np.int64), 5, 8)
    np.testing.assert_array_equal(flat.sorted_token_ids, got.sorted_token_ids)


@pytest.mark.parametrize("block_size", [0, 7, 24, 128, True, 16.0, "16"])
def test_align_rejects_block_size(block_size):
    ids = np.zeros((2, 2), np.int32)
    with pytest.raises(MoEError, match="block_size"):
        nm.moe_align_block_size(ids, 4, block_size)
    with pytest.raises(MoEError, match="block_size"):
        nm.BucketPlan.build(ids, np.ones((2, 2), np.float32), 4).align(block_size)


# --------------------------------------------------------------------------
# pick_block_size
# --------------------------------------------------------------------------

def test_pick_matches_reference_for_counts_and_offsets():
    rng = np.random.default_rng(16)
    picked = set()
    for n_tok, k, n in SHAPES + [(512, 8, 128), (4096, 8, 8), (256, 8, 16), (2048, 4, 32)]:
        ids, w = random_routing(rng, n_tok, k, n, distinct=k <= n)
        plan = nm.BucketPlan.build(ids, w, n)
        want = ref_pick(plan.counts, plan.num_pairs)
        assert nm.pick_block_size(plan.counts, plan.num_pairs) == want
        assert nm.pick_block_size(plan.expert_offsets, plan.num_pairs) == want
        assert nm.pick_block_size(plan.counts.astype(np.int32), plan.num_pairs) == want
        picked.add(want)
    assert picked == {16, 64}


def test_pick_edges():
    assert nm.pick_block_size(np.zeros(8, np.int64), 0) == 16
    assert nm.pick_block_size(np.zeros(9, np.int64), 0) == 16
    assert nm.pick_block_size(np.zeros(0, np.int64), 0) == 16
    assert nm.pick_block_size(np.array([64, 128]), 192) == 64
    assert nm.pick_block_size(np.array([0, 64, 192]), 192) == 64   # offsets
    assert nm.pick_block_size(np.array([50]), 50) == 64            # 64 <= 65
    assert nm.pick_block_size(np.array([49]), 49) == 16            # 64 > 63.7
    # exactly 1.3x is allowed: 13 blocks of 64 for 640 pairs
    counts = np.array([49] * 12 + [52])
    assert counts.sum() == 640 and nm.pick_block_size(counts, 640) == 64
    assert nm.pick_block_size(np.array([1] * 8), 8) == 16
    assert nm.pick_block_size(np.array([30] * 8), 240) == 32       # 256 <= 312; 512 > 312


@pytest.mark.parametrize("arr, total", [
    (np.array([1, 2, 3]), 7),          # neither reading
    (np.array([0, 3, 2]), 2),          # offsets not monotone; sum != total
    (np.array([1, 3, 5]), 5),          # offsets not from 0
    (np.array([-1, 4]), 3),            # negative count
    (np.array([[1, 2]]), 3),           # 2-D
    (np.array([1.0, 2.0]), 3),         # floats
    (np.array([1, 2]), -3),            # negative total
])
def test_pick_rejects(arr, total):
    with pytest.raises(MoEError):
        nm.pick_block_size(arr, total)


def test_pick_config_override_wins():
    counts = np.array([1] * 8)
    for bs in config.BLOCK_SIZES:
        with config.override(block_size=bs):
            assert nm.pick_block_size(counts, 8) == bs
            assert nm.pick_block_size(np.zeros(4, np.int64), 0) == bs
    assert nm.pick_block_size(counts, 8) == 16


@pytest.mark.parametrize("raw", ["7", "0", "128", "abc", "16.0", "-16"])
def test_bad_block_size_env_warns(raw):
    with pytest.warns(RuntimeWarning, match="NUMBA_MOE_BLOCK_SIZE"):
        cfg = config.parse_env({"NUMBA_MOE_BLOCK_SIZE": raw})
    assert cfg.block_size is None


def test_good_block_size_env():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for bs in config.BLOCK_SIZES:
            assert config.parse_env({"NUMBA_MOE_BLOCK_SIZE": str(bs)}).block_size == bs
        assert config.parse_env({}).block_size is None

"""XLA paths of the sparse attention ops against the float64 dense masked reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import ops
from jaxlab.ops import sparse_attention as sparse_ops
from tests.kernels_pallas.sparse_attention_test import (
    dense_reference,
    hash_mask,
    make_inputs,
    qk_mask,
    reference_grads,
)


@pytest.mark.parametrize("capacity", [None, (70, 60), (20, 20)])  # (20, 20) is too small
def test_qk_sparse_xla_matches_reference_with_and_without_capacity(capacity):
    rng, (q, k, v) = make_inputs(1, 2, 130, 4, 2, 32)
    q_keep = rng.random((2, 130, 4)) < 0.4
    k_keep = rng.random((2, 130, 2)) < 0.35
    q_keep[1, :, 2] = False
    mask = qk_mask(q_keep, k_keep, 4)

    def fn(q, k, v):
        return ops.qk_sparse_attention(
            q, k, v, jnp.asarray(q_keep), jnp.asarray(k_keep), impl="xla", capacity=capacity
        )

    out = np.asarray(jax.jit(fn)(q, k, v))
    np.testing.assert_allclose(out, dense_reference(q, k, v, mask), atol=2e-5)
    assert np.all(out.transpose(0, 2, 1, 3)[~mask.any(-1)] == 0.0)
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    got = jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=(0, 1, 2))(q, k, v)
    for g, want in zip(got, reference_grads(q, k, v, mask, ct), strict=True):
        np.testing.assert_allclose(np.asarray(g), want, atol=5e-5)


@pytest.mark.parametrize("window,block", [(None, 128), (3, 32), (1, 32), (2, 16)])
def test_hash_sparse_xla_matches_reference_for_any_window(window, block):
    rng, (q, k, v) = make_inputs(2, 2, 150, 4, 2, 32)
    q_buckets = rng.integers(0, 6, (2, 150, 4), dtype=np.int32)
    k_buckets = rng.integers(0, 6, (2, 150, 2), dtype=np.int32)
    mask = hash_mask(q_buckets, k_buckets, 4)

    def fn(q, k, v):
        return ops.hash_sparse_attention(
            q,
            k,
            v,
            jnp.asarray(q_buckets),
            jnp.asarray(k_buckets),
            impl="xla",
            window=window,
            block=block,
        )

    np.testing.assert_allclose(
        np.asarray(jax.jit(fn)(q, k, v)), dense_reference(q, k, v, mask), atol=2e-5
    )
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    got = jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=(0, 1, 2))(q, k, v)
    for g, want in zip(got, reference_grads(q, k, v, mask, ct), strict=True):
        np.testing.assert_allclose(np.asarray(g), want, atol=5e-5)


def test_impls_agree_and_bad_impl_is_named():
    rng, (q, k, v) = make_inputs(3, 1, 40, 2, 1, 16)
    qb = jnp.asarray(rng.integers(0, 3, (1, 40, 2)), jnp.int32)
    kb = jnp.asarray(rng.integers(0, 3, (1, 40, 1)), jnp.int32)
    outs = [ops.hash_sparse_attention(q, k, v, qb, kb, impl=i) for i in ("auto", "xla", "pallas")]
    for out in outs[1:]:
        np.testing.assert_allclose(np.asarray(out), np.asarray(outs[0]), atol=2e-5)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.hash_sparse_attention(q, k, v, qb, kb, impl="triton")
    with pytest.raises(ValueError, match="k_buckets must be >= 0"):
        ops.hash_sparse_attention(q, k, v, qb, kb - 5, impl="xla")
    with pytest.raises(ValueError, match="q_keep must be a bool mask"):
        ops.qk_sparse_attention(q, k, v, qb, kb > 0, impl="xla")


def test_hash_window_covers_mean_bucket_with_slack():
    assert ops.hash_window(8192, 8, 128) == 19  # (128 + 2 * 1024) / 128 = 17 tiles, + 2
    assert ops.hash_window(256, 1, 128) == 2  # never more than the whole sequence


def test_xla_paths_respect_packed_segments():
    rng, (q, k, v) = make_inputs(12, 2, 100, 4, 2, 16)
    segment_ids = np.cumsum(rng.random((2, 100)) < 0.05, axis=1).astype(np.int32)
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    q_keep, k_keep = rng.random((2, 100, 4)) < 0.5, rng.random((2, 100, 2)) < 0.5
    out = ops.qk_sparse_attention(
        q,
        k,
        v,
        jnp.asarray(q_keep),
        jnp.asarray(k_keep),
        segment_ids=jnp.asarray(segment_ids),
        impl="xla",
        capacity=(80, 80),
    )
    want = dense_reference(q, k, v, qk_mask(q_keep, k_keep, 4) & same)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5)
    qb = rng.integers(0, 4, (2, 100, 4), dtype=np.int32)
    kb = rng.integers(0, 4, (2, 100, 2), dtype=np.int32)
    out = ops.hash_sparse_attention(
        q,
        k,
        v,
        jnp.asarray(qb),
        jnp.asarray(kb),
        segment_ids=jnp.asarray(segment_ids),
        impl="xla",
        block=16,
        window=3,
    )
    want = dense_reference(q, k, v, hash_mask(qb, kb, 4) & same)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5)


def test_only_the_compiled_kernels_run_per_shard():
    """XLA partitions the XLA paths itself; a Pallas call it cannot (Mosaic: refused; Triton:
    its operands gathered onto every device)."""
    from jaxlab.ops.sparse_attention import needs_per_shard
    from kernels_pallas._common import target_platform

    for platform in ("tpu", "gpu"):
        with target_platform(platform):
            assert needs_per_shard("auto") and needs_per_shard("pallas")
            assert not needs_per_shard("xla")
    with target_platform("cpu"):  # auto is XLA there; interpret-mode kernels are tests only
        assert not any(needs_per_shard(impl) for impl in ("auto", "xla"))


def _uses_sort(fn, *args):
    """Whether ``fn`` traces to a sort: the XLA sparse paths sort rows, the dense path does not."""
    return "sort" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("kind", ["qk", "hash"])
def test_auto_falls_back_to_the_same_function_where_sparsity_cannot_pay(kind):
    """No hint (the XLA path would compute every pair): auto runs the dense masked path, which
    matches the sparse XLA path and the float64 reference, forward and gradients, with GQA,
    packed segments and queries that see no key."""
    rng, (q, k, v) = make_inputs(21, 2, 130, 4, 2, 16)
    segment_ids = np.cumsum(rng.random((2, 130)) < 0.05, axis=1).astype(np.int32)
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if kind == "qk":
        a, b = rng.random((2, 130, 4)) < 0.6, rng.random((2, 130, 2)) < 0.3
        mask, op = qk_mask(a, b, 4) & same, ops.qk_sparse_attention
        assert sparse_ops.qk_auto_impl(130, None) == "dense"
    else:
        a = rng.integers(0, 5, (2, 130, 4), dtype=np.int32)
        b = rng.integers(0, 5, (2, 130, 2), dtype=np.int32)
        mask, op = hash_mask(a, b, 4) & same, ops.hash_sparse_attention
        assert sparse_ops.hash_auto_impl(130, None, 128) == "dense"
    a, b, segments = jnp.asarray(a), jnp.asarray(b), jnp.asarray(segment_ids)

    def run(impl):
        return lambda q, k, v: op(q, k, v, a, b, segment_ids=segments, impl=impl)

    auto, sparse = run("auto"), run("xla")
    assert not _uses_sort(auto, q, k, v) and _uses_sort(sparse, q, k, v)
    out = np.asarray(jax.jit(auto)(q, k, v))
    np.testing.assert_allclose(out, dense_reference(q, k, v, mask), atol=2e-5)
    np.testing.assert_allclose(out, np.asarray(sparse(q, k, v)), atol=2e-6)
    assert (~mask.any(-1)).any() and np.all(out.transpose(0, 2, 1, 3)[~mask.any(-1)] == 0.0)
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def grads(fn):
        return jax.grad(lambda *x: jnp.sum(fn(*x) * ct), argnums=(0, 1, 2))(q, k, v)

    got, via_sparse = grads(auto), grads(sparse)
    for g, s, want in zip(got, via_sparse, reference_grads(q, k, v, mask, ct), strict=True):
        np.testing.assert_allclose(np.asarray(g), want, atol=5e-5)
        np.testing.assert_allclose(np.asarray(g), np.asarray(s), atol=5e-6)


def test_auto_rule_picks_by_the_static_work_fraction():
    """Work fractions counted by hand at seq 1024 (8 tiles of 128 rows), on both sides of
    XLA_MAX_WORK = 0.7; GPU and TPU always run the kernels."""
    from kernels_pallas._common import target_platform

    assert sparse_ops.XLA_MAX_WORK == 0.7
    # Capacities round up to 128 rows: 700 -> 768, 896 stays, 900 -> 1024 (all rows).
    assert sparse_ops.qk_xla_work(1024, (700, 896)) == 768 * 896 / 1024**2  # 0.66
    assert sparse_ops.qk_xla_work(1024, (896, 896)) == 0.765625
    assert sparse_ops.qk_xla_work(1024, (900, 10)) == 0.125
    assert sparse_ops.qk_xla_work(1024, None) == sparse_ops.qk_xla_work(1024, (1000, 1000)) == 1.0
    assert sparse_ops.hash_xla_work(1024, 5, 128) == 0.625
    assert sparse_ops.hash_xla_work(1024, 6, 128) == 0.75
    assert sparse_ops.hash_xla_work(1000, 6, 128) == 1024 * 768 / 1000**2  # padded tiles count
    assert sparse_ops.hash_xla_work(1024, None) == sparse_ops.hash_xla_work(1024, 8) == 1.0
    assert sparse_ops.hash_xla_work(256, 2, 512) == 1.0  # one tile of the whole sequence
    picks = {
        "qk below": sparse_ops.qk_auto_impl(1024, (700, 896)),
        "qk above": sparse_ops.qk_auto_impl(1024, (896, 896)),
        "qk no hint": sparse_ops.qk_auto_impl(1024),
        "hash below": sparse_ops.hash_auto_impl(1024, 5, 128),
        "hash above": sparse_ops.hash_auto_impl(1024, 6, 128),
        "hash no hint": sparse_ops.hash_auto_impl(1024),
    }
    assert picks == {
        "qk below": "xla",
        "qk above": "dense",
        "qk no hint": "dense",
        "hash below": "xla",
        "hash above": "dense",
        "hash no hint": "dense",
    }
    for platform in ("gpu", "tpu"):
        with target_platform(platform):
            assert sparse_ops.qk_auto_impl(1024) == sparse_ops.hash_auto_impl(1024) == "pallas"


def test_auto_runs_the_sparse_path_below_the_threshold():
    """The dispatch follows the rule: a window of 2 of 8 tiles (work 0.25) runs the sorted XLA
    path under auto, which still matches the reference."""
    rng, (q, k, v) = make_inputs(22, 1, 128, 2, 1, 16)
    qb = rng.integers(0, 8, (1, 128, 2), dtype=np.int32)
    kb = rng.integers(0, 8, (1, 128, 1), dtype=np.int32)
    assert sparse_ops.hash_auto_impl(128, 2, 16) == "xla"

    def auto(q, k, v):
        qbj, kbj = jnp.asarray(qb), jnp.asarray(kb)
        return ops.hash_sparse_attention(q, k, v, qbj, kbj, impl="auto", window=2, block=16)

    assert _uses_sort(auto, q, k, v)
    np.testing.assert_allclose(
        np.asarray(auto(q, k, v)), dense_reference(q, k, v, hash_mask(qb, kb, 2)), atol=2e-5
    )

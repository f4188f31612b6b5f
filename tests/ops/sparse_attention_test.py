"""XLA paths of the sparse attention ops against the float64 dense masked reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import ops
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

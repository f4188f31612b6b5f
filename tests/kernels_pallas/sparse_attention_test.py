"""Sparse flash attention kernels (interpret mode) against a dense masked float64 computation.

Tolerances: float32 inputs 2e-5 (outputs) and 5e-5 (gradients) absolute, against float64; bf16
and fp16 inputs 3e-2 absolute against float64 on the same (rounded) inputs, as jax's own Pallas
attention tests use for half precision.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import sparse_attention as sa

SMALL = sa.BlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)


def dense_reference(q, k, v, mask):
    """softmax over allowed keys in float64 NumPy, one (batch, head) at a time; empty rows 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, seq, heads, dim = q.shape
    groups = heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            logits = q[b, :, h] @ k[b, :, h // groups].T / np.sqrt(dim)
            for i in range(seq):
                allowed = mask[b, h, i]
                if allowed.any():
                    w = np.exp(logits[i, allowed] - logits[i, allowed].max())
                    out[b, i, h] = (w / w.sum()) @ v[b, allowed, h // groups]
    return out


def qk_mask(q_keep, k_keep, heads):
    seq = q_keep.shape[1]
    kk = np.repeat(k_keep, heads // k_keep.shape[2], axis=2)
    causal = np.tril(np.ones((seq, seq), bool))
    return q_keep.transpose(0, 2, 1)[..., None] & kk.transpose(0, 2, 1)[:, :, None, :] & causal


def hash_mask(q_buckets, k_buckets, heads):
    seq = q_buckets.shape[1]
    kb = np.repeat(k_buckets, heads // k_buckets.shape[2], axis=2)
    causal = np.tril(np.ones((seq, seq), bool))
    same = q_buckets.transpose(0, 2, 1)[..., None] == kb.transpose(0, 2, 1)[:, :, None, :]
    return same & causal


def make_inputs(seed, batch, seq, heads, kv_heads, dim, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = [(batch, seq, heads, dim), (batch, seq, kv_heads, dim), (batch, seq, kv_heads, dim)]
    return rng, [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def reference_grads(q, k, v, mask, cotangent):
    """Gradients of sum(out * cotangent) from the float64 jnp reference (autodiff of the math)."""
    with jax.enable_x64(True):
        mask = jnp.asarray(mask)
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        ct = jnp.asarray(np.asarray(cotangent, np.float64))

        def loss(q, k, v):
            return jnp.sum(sa.masked_attention_reference(q, k, v, mask) * ct)

        return [np.asarray(g) for g in jax.grad(loss, argnums=(0, 1, 2))(*args)]


def kernel_grads(fn, q, k, v, cotangent):
    return jax.grad(
        lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent), argnums=(0, 1, 2)
    )(q, k, v)


# (batch, seq, heads, kv_heads, head_dim, block sizes): lengths that are not multiples of the
# blocks, GQA, head_dim 64 / 128 / padded 48, one (batch, head) only.
SHAPES = [
    (2, 100, 4, 2, 64, SMALL),
    (1, 77, 3, 1, 128, SMALL),
    (1, 50, 1, 1, 48, SMALL),
    (2, 130, 2, 2, 64, None),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_qk_sparse_forward_and_gradients_match_float64_reference(shape):
    batch, seq, heads, kv_heads, dim, blocks = shape
    rng, (q, k, v) = make_inputs(seq, batch, seq, heads, kv_heads, dim)
    q_keep = rng.random((batch, seq, heads)) < rng.uniform(0.2, 0.9, heads)
    k_keep = rng.random((batch, seq, kv_heads)) < rng.uniform(0.2, 0.9, kv_heads)
    q_keep[0, :, 0] = False  # an all-dropped head
    mask = qk_mask(q_keep, k_keep, heads)

    def attention(q, k, v):
        return sa.qk_sparse_attention(
            q, k, v, jnp.asarray(q_keep), jnp.asarray(k_keep), block_sizes=blocks
        )

    out = np.asarray(attention(q, k, v))
    np.testing.assert_allclose(out, dense_reference(q, k, v, mask), atol=2e-5)
    assert np.all(out.transpose(0, 2, 1, 3)[~mask.any(-1)] == 0.0)  # exactly 0, not just small
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    pairs = zip(
        kernel_grads(attention, q, k, v, ct), reference_grads(q, k, v, mask, ct), strict=True
    )
    for got, want in pairs:
        np.testing.assert_allclose(np.asarray(got), want, atol=5e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_hash_sparse_forward_and_gradients_match_float64_reference(shape):
    batch, seq, heads, kv_heads, dim, blocks = shape
    rng, (q, k, v) = make_inputs(seq + 1, batch, seq, heads, kv_heads, dim)
    num_buckets = int(rng.integers(2, 9))
    q_buckets = rng.integers(0, num_buckets, (batch, seq, heads), dtype=np.int32)
    k_buckets = rng.integers(0, num_buckets, (batch, seq, kv_heads), dtype=np.int32)
    q_buckets[0, :, 0] = num_buckets  # a bucket with no keys: the whole head is empty
    mask = hash_mask(q_buckets, k_buckets, heads)

    def attention(q, k, v):
        return sa.hash_sparse_attention(
            q, k, v, jnp.asarray(q_buckets), jnp.asarray(k_buckets), block_sizes=blocks
        )

    out = np.asarray(attention(q, k, v))
    np.testing.assert_allclose(out, dense_reference(q, k, v, mask), atol=2e-5)
    assert np.all(out.transpose(0, 2, 1, 3)[~mask.any(-1)] == 0.0)
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    pairs = zip(
        kernel_grads(attention, q, k, v, ct), reference_grads(q, k, v, mask, ct), strict=True
    )
    for got, want in pairs:
        np.testing.assert_allclose(np.asarray(got), want, atol=5e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    rng, (q, k, v) = make_inputs(7, 1, 96, 4, 2, 64, dtype)
    q_keep = rng.random((1, 96, 4)) < 0.5
    k_keep = rng.random((1, 96, 2)) < 0.5
    mask = qk_mask(q_keep, k_keep, 4)

    def attention(q, k, v):
        return sa.qk_sparse_attention(
            q, k, v, jnp.asarray(q_keep), jnp.asarray(k_keep), block_sizes=SMALL
        )

    out = attention(q, k, v)
    assert out.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(out, np.float64), dense_reference(q, k, v, mask), atol=3e-2
    )
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    pairs = zip(
        kernel_grads(attention, q, k, v, ct), reference_grads(q, k, v, mask, ct), strict=True
    )
    for got, want in pairs:
        assert got.dtype == dtype
        np.testing.assert_allclose(
            np.asarray(got, np.float64), want, atol=3e-2 * max(1, np.abs(want).max())
        )


def test_one_bucket_is_dense_causal_attention_and_all_kept_likewise():
    from jaxlab import ops

    rng, (q, k, v) = make_inputs(3, 2, 70, 4, 2, 64)
    want = ops.attention(q, k, v, causal=True)

    def zeros(hh):
        return jnp.zeros((2, 70, hh), jnp.int32)

    def ones(hh):
        return jnp.ones((2, 70, hh), bool)

    got_hash = sa.hash_sparse_attention(q, k, v, zeros(4), zeros(2), block_sizes=SMALL)
    got_qk = sa.qk_sparse_attention(q, k, v, ones(4), ones(2), block_sizes=SMALL)
    np.testing.assert_allclose(np.asarray(got_hash), np.asarray(want), atol=2e-5)
    np.testing.assert_allclose(np.asarray(got_qk), np.asarray(want), atol=2e-5)


def exact_live(mask, block_q, block_k):
    """[batch, heads, nq, nk]: tiles holding at least one allowed pair."""
    b, h, sq, sk = mask.shape
    return mask.reshape(b, h, sq // block_q, block_q, sk // block_k, block_k).any(axis=(3, 5))


def test_live_tile_lists_skip_exactly_the_empty_tiles_for_qk_and_cover_hash():
    """The kernels loop over live_tiles; QK lists must be exact, hash lists a superset."""
    rng = np.random.default_rng(0)
    batch, seq, heads, kv_heads, bq, bk = 2, 256, 4, 2, 32, 16
    q_keep = rng.random((batch, seq, heads)) < 0.5
    k_keep = rng.random((batch, seq, kv_heads)) < 0.5
    q_order, q_kept = sa.compact_order(jnp.asarray(q_keep))
    k_order, k_kept = sa.compact_order(jnp.asarray(k_keep))
    q_pos = np.asarray(jnp.where(q_kept, q_order, -1)).transpose(0, 2, 1)
    k_pos = np.asarray(jnp.where(k_kept, k_order, 2**30)).transpose(0, 2, 1)
    zq, zk = np.zeros_like(q_pos), np.zeros_like(k_pos)
    _, kv_count, _, q_count = sa.live_tiles(q_pos, k_pos, zq, zk, bq, bk)
    k_rep = np.repeat(k_pos, heads // kv_heads, axis=1)
    mask = q_pos[..., :, None] >= k_rep[..., None, :]
    live = exact_live(mask, bq, bk)
    np.testing.assert_array_equal(np.asarray(kv_count), live.sum(-1))
    np.testing.assert_array_equal(np.asarray(q_count), live.sum(-2))
    # Half the queries and keys dropped: about a quarter of the dense causal tiles remain.
    dense_tiles = sum(-(-(i + 1) * bq // bk) for i in range(seq // bq))
    assert live.sum(axis=(-1, -2)).mean() < 0.45 * dense_tiles

    buckets_q = rng.integers(0, 8, (batch, seq, heads), dtype=np.int32)
    buckets_k = rng.integers(0, 8, (batch, seq, kv_heads), dtype=np.int32)
    q_order, q_sorted = sa.bucket_order(jnp.asarray(buckets_q))
    k_order, k_sorted = sa.bucket_order(jnp.asarray(buckets_k))

    def rows(x):
        return np.asarray(x).transpose(0, 2, 1)

    kv_tiles, kv_count, _, _ = sa.live_tiles(
        rows(q_order), rows(k_order), rows(q_sorted), rows(k_sorted), bq, bk
    )

    def k_rep(x):
        return np.repeat(rows(x), heads // kv_heads, axis=1)

    mask = (rows(q_order)[..., :, None] >= k_rep(k_order)[..., None, :]) & (
        rows(q_sorted)[..., :, None] == k_rep(k_sorted)[..., None, :]
    )
    exact = exact_live(mask, bq, bk)
    listed = np.zeros_like(exact)
    kv_tiles, kv_count = np.asarray(kv_tiles), np.asarray(kv_count)
    for idx in np.ndindex(kv_count.shape):
        listed[idx][kv_tiles[idx][: kv_count[idx]]] = True
    assert np.all(listed >= exact)
    assert listed.sum() < 0.35 * listed.size  # 8 buckets: most tiles skipped


def test_bad_arguments_are_named():
    q = jnp.zeros((1, 8, 4, 16))
    k = jnp.zeros((1, 8, 2, 16))
    keep_q, keep_k = jnp.ones((1, 8, 4), bool), jnp.ones((1, 8, 2), bool)
    with pytest.raises(ValueError, match="q_keep must be a bool mask"):
        sa.qk_sparse_attention(q, k, k, keep_q.astype(jnp.float32), keep_k)
    with pytest.raises(ValueError, match=r"k_keep must have shape \(1, 8, 2\)"):
        sa.qk_sparse_attention(q, k, k, keep_q, jnp.ones((1, 8, 4), bool))
    with pytest.raises(ValueError, match="k and v must both be"):
        sa.qk_sparse_attention(q, k, jnp.zeros((1, 7, 2, 16)), keep_q, keep_k)
    with pytest.raises(ValueError, match="heads=4 .* multiple of kv_heads=3"):
        sa.qk_sparse_attention(
            q, jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 3, 16)), keep_q, jnp.ones((1, 8, 3), bool)
        )
    buckets_q, buckets_k = jnp.zeros((1, 8, 4), jnp.int32), jnp.zeros((1, 8, 2), jnp.int32)
    with pytest.raises(ValueError, match="k_buckets must be >= 0, got a minimum of -1"):
        sa.hash_sparse_attention(q, k, k, buckets_q, buckets_k.at[0, 3, 1].set(-1))
    with pytest.raises(ValueError, match="q_buckets must be integer bucket ids"):
        sa.hash_sparse_attention(q, k, k, buckets_q.astype(jnp.float32), buckets_k)
    with pytest.raises(ValueError, match="BlockSizes.block_k must be a power of two"):
        sa.BlockSizes(block_k=48)


@pytest.mark.parametrize("dtype,dim", [(jnp.float32, 64), (jnp.bfloat16, 128), (jnp.float16, 80)])
@pytest.mark.parametrize("kind", ["qk", "hash"])
def test_forward_and_backward_lower_to_triton_for_cuda(kind, dtype, dim):
    """Runs the Pallas -> Triton lowering on this CPU host (what interpret mode cannot check)."""
    batch, seq, heads, kv_heads = 2, 300, 4, 2
    spec = jax.ShapeDtypeStruct
    q, k = spec((batch, seq, heads, dim), dtype), spec((batch, seq, kv_heads, dim), dtype)
    if kind == "qk":
        fn = sa.qk_sparse_attention
        masks = spec((batch, seq, heads), jnp.bool_), spec((batch, seq, kv_heads), jnp.bool_)
    else:
        fn = sa.hash_sparse_attention
        masks = spec((batch, seq, heads), jnp.int32), spec((batch, seq, kv_heads), jnp.int32)

    def forward_backward(q, k, v, a, b):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, a, b, interpret=False), q, k, v)
        return out, vjp(out)

    lowered = jax.jit(forward_backward).trace(q, k, k, *masks).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    for kernel in (
        "sparse_flash_attention_fwd",
        "sparse_flash_attention_dq",
        "sparse_flash_attention_dkv",
    ):
        assert kernel in text
    assert text.count("__gpu$xla.gpu.triton") >= 3


def segment_mask(segment_ids):
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


@pytest.mark.parametrize("kind", ["qk", "hash"])
def test_packed_segments_restrict_attention_to_each_document(kind):
    rng, (q, k, v) = make_inputs(11, 2, 90, 4, 2, 32)
    segment_ids = np.cumsum(rng.random((2, 90)) < 0.05, axis=1).astype(np.int32)
    if kind == "qk":
        a = rng.random((2, 90, 4)) < 0.6
        b = rng.random((2, 90, 2)) < 0.6
        mask = qk_mask(a, b, 4) & segment_mask(segment_ids)
        fn = sa.qk_sparse_attention
    else:
        a = rng.integers(0, 3, (2, 90, 4), dtype=np.int32)
        b = rng.integers(0, 3, (2, 90, 2), dtype=np.int32)
        mask = hash_mask(a, b, 4) & segment_mask(segment_ids)
        fn = sa.hash_sparse_attention
    out = fn(
        q,
        k,
        v,
        jnp.asarray(a),
        jnp.asarray(b),
        segment_ids=jnp.asarray(segment_ids),
        block_sizes=SMALL,
    )
    np.testing.assert_allclose(np.asarray(out), dense_reference(q, k, v, mask), atol=2e-5)
    with pytest.raises(ValueError, match=r"segment_ids must be integers of shape \(2, 90\)"):
        fn(q, k, v, jnp.asarray(a), jnp.asarray(b), segment_ids=jnp.zeros((2, 91), jnp.int32))


@pytest.mark.parametrize("rows", [37, 20])
def test_permute_rows_gradient_is_the_inverse_gather(rows):
    """The custom VJP (a gather by the inverse) equals autodiff of the gather it replaces."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 37, 3, 4)), jnp.float32)
    order = jnp.asarray(np.argsort(rng.random((2, 37, 3)), axis=1), jnp.int32)
    inverse = sa.inverse_permutation(order)
    identity = np.take_along_axis(np.asarray(order), np.asarray(inverse), 1)
    np.testing.assert_array_equal(
        identity, np.broadcast_to(np.arange(37)[None, :, None], (2, 37, 3))
    )
    ct = jnp.asarray(rng.standard_normal((2, rows, 3, 4)), jnp.float32)
    prefix = order[:, :rows]
    got = jax.grad(lambda x: jnp.sum(sa.permute_rows(x, prefix, inverse) * ct))(x)
    want = jax.grad(lambda x: jnp.sum(jnp.take_along_axis(x, prefix[..., None], axis=1) * ct))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

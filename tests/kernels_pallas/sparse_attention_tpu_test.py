"""Sparse flash attention's Mosaic (TPU) kernels: Pallas' TPU interpret mode on this CPU against
the dense masked float64 references, and the lowering for TPU (what interpret mode cannot check).

Tolerances as for the Triton kernels: float32 2e-5 (outputs) and 5e-5 (gradients) absolute; bf16
3e-2 absolute (gradients relative to their largest value), against float64 on the same (rounded)
inputs. The shapes are tiny: TPU interpret mode emulates every grid step, and the tiles are at
least 128 rows, so 130-300 tokens already give two or three tiles and padding steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.ops import sparse_attention as sparse_ops
from kernels_pallas import sparse_attention as sa
from kernels_pallas._common import target_platform
from kernels_pallas.sparse_attention import kernel_tpu
from tests.kernels_pallas.tpu_testing import V5E

# Tiles of the forward and backward kernels that differ (one padded length serves both).
MIXED = sa.BlockSizes(block_q=256, block_k=128, block_q_bwd=128, block_k_bwd=256)


def make_case(kind, seed, batch, seq, heads, kv_heads, dim, dtype):
    """Inputs, masks (with an empty head) and a cotangent for one case."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, seq, heads, dim)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((batch, seq, kv_heads, dim)), dtype) for _ in "kv")
    if kind == "qk":
        a = rng.random((batch, seq, heads)) < rng.uniform(0.3, 0.9, heads)
        b = rng.random((batch, seq, kv_heads)) < rng.uniform(0.3, 0.9, kv_heads)
        a[0, :, -1] = False  # an all-dropped head
    else:
        buckets = int(rng.integers(2, 6))
        a = rng.integers(0, buckets, (batch, seq, heads), dtype=np.int32)
        b = rng.integers(0, buckets, (batch, seq, kv_heads), dtype=np.int32)
        a[0, :, -1] = buckets  # a bucket with no keys: the whole head is empty
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    return (q, k, v), (jnp.asarray(a), jnp.asarray(b)), ct


def entry(kind):
    return sa.qk_sparse_attention if kind == "qk" else sa.hash_sparse_attention


def reference(kind, qkv, masks, ct, segment_ids):
    """Output and (q, k, v) gradients of the float64 dense masked reference."""
    fn = sa.qk_sparse_attention_reference if kind == "qk" else sa.hash_sparse_attention_reference
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in qkv]
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, *masks, segment_ids=segment_ids), *args)
        grads = vjp(jnp.asarray(np.asarray(ct, np.float64)))
        return np.asarray(out), [np.asarray(g) for g in grads]


def tpu_interpret(kind, qkv, masks, ct, **kw):
    """Output and gradients of the Mosaic kernels in TPU interpret mode."""
    with target_platform("tpu"):
        out, vjp = jax.vjp(lambda q, k, v: entry(kind)(q, k, v, *masks, interpret=True, **kw), *qkv)
        grads = vjp(ct.astype(out.dtype))
    return out, grads


def empty_rows(kind, masks, seq, heads, segment_ids):
    """[batch, seq, heads]: queries with no allowed key."""
    a, b = (np.asarray(m) for m in masks)
    b = np.repeat(b, heads // b.shape[2], axis=2)
    causal = np.tril(np.ones((seq, seq), bool))[None, None]
    if kind == "qk":
        allowed = a.transpose(0, 2, 1)[..., None] & b.transpose(0, 2, 1)[:, :, None, :]
    else:
        allowed = a.transpose(0, 2, 1)[..., None] == b.transpose(0, 2, 1)[:, :, None, :]
    allowed &= causal
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        allowed &= seg[:, None, :, None] == seg[:, None, None, :]
    return ~allowed.any(-1).transpose(0, 2, 1)


# (kind, batch, seq, heads, kv_heads, head_dim, dtype, block sizes, packed segments): odd
# lengths, GQA (one and two kv heads), head_dim 32 / padded 48 / 64 / 128, forward and
# backward tiles that differ, bf16.
CASES = [
    ("qk", 1, 300, 2, 1, 64, jnp.float32, MIXED, True),
    ("hash", 1, 150, 2, 1, 48, jnp.float32, None, False),
    ("qk", 1, 130, 2, 2, 128, jnp.bfloat16, None, False),
    ("hash", 2, 140, 2, 1, 64, jnp.bfloat16, None, True),
    ("qk", 1, 140, 4, 2, 32, jnp.float32, None, False),  # two kv heads, two query heads each
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{jnp.dtype(c[6]).name}-{c[2]}")
def test_interpret_mode_matches_float64_reference(case):
    kind, batch, seq, heads, kv_heads, dim, dtype, blocks, packed = case
    qkv, masks, ct = make_case(kind, seq, batch, seq, heads, kv_heads, dim, dtype)
    segment_ids = None
    if packed:
        rng = np.random.default_rng(seq + 1)
        segment_ids = jnp.asarray(np.cumsum(rng.random((batch, seq)) < 0.02, axis=1), jnp.int32)
    out, grads = tpu_interpret(kind, qkv, masks, ct, block_sizes=blocks, segment_ids=segment_ids)
    want, want_grads = reference(kind, qkv, masks, ct, segment_ids)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    half = dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=3e-2 if half else 2e-5)
    empty = empty_rows(kind, masks, seq, heads, segment_ids)
    assert empty.any()
    assert np.all(np.asarray(out)[empty] == 0.0)  # exactly 0, not just small
    for got, grad in zip(grads, want_grads, strict=True):
        atol = 3e-2 * max(1.0, np.abs(grad).max()) if half else 5e-5
        np.testing.assert_allclose(np.asarray(got, np.float64), grad, atol=atol)


def test_tiles_are_multiples_of_the_lanes():
    # Raised to 128 rows, capped at the sequence's tiles rounded up to a power of two.
    assert kernel_tpu._fit_block(16, 1000) == 128
    assert kernel_tpu._fit_block(512, 300) == 512
    assert kernel_tpu._fit_block(512, 200) == 256
    assert kernel_tpu._fit_block(256, 4096) == 256


def test_padding_steps_repeat_the_last_tile_of_the_range():
    """The index maps' tiles: the range, then its last tile again (an unchanged block index, so
    the pipeline copies nothing); an empty range stays on its first tile."""
    first, span = jnp.asarray([2, 0], jnp.int32), jnp.asarray([3, 0], jnp.int32)

    def fetched(row):
        return [int(kernel_tpu._live_entry(first, span, row, t)) for t in range(6)]

    assert fetched(0) == [2, 3, 4, 4, 4, 4]
    assert fetched(1) == [0] * 6


def test_tile_ranges_are_the_qk_lists_and_cover_the_hash_lists():
    rng = np.random.default_rng(1)
    batch, seq, heads, kv_heads, block = 2, 1024, 4, 2, 128
    keep_q = jnp.asarray(rng.random((batch, seq, heads)) < 0.4)
    keep_k = jnp.asarray(rng.random((batch, seq, kv_heads)) < 0.4)
    q_order, q_kept = sa.compact_order(keep_q)
    k_order, k_kept = sa.compact_order(keep_k)
    q_pos = sa.to_rows(jnp.where(q_kept, q_order, sa.PAD_Q_POS))
    k_pos = sa.to_rows(jnp.where(k_kept, k_order, sa.PAD_K_POS))
    buckets_q = jnp.asarray(rng.integers(0, 4, (batch, seq, heads)), jnp.int32)
    buckets_k = jnp.asarray(rng.integers(0, 4, (batch, seq, kv_heads)), jnp.int32)
    (q_order_h, q_sorted), (k_order_h, k_sorted) = map(sa.bucket_order, (buckets_q, buckets_k))
    for kind, rows in (
        ("qk", (q_pos, k_pos, jnp.zeros_like(q_pos), jnp.zeros_like(k_pos))),
        ("hash", tuple(map(sa.to_rows, (q_order_h, k_order_h, q_sorted, k_sorted)))),
    ):
        kv_tiles, kv_count, q_tiles, q_count = sa.live_tiles(*rows, block, block)
        for tiles, count in ((kv_tiles, kv_count), (q_tiles, q_count)):
            first, span = (np.asarray(x) for x in sa.tile_ranges(tiles, count))
            tiles, count = np.asarray(tiles), np.asarray(count)
            for idx in np.ndindex(count.shape):
                live = set(tiles[idx][: count[idx]].tolist())
                covered = set(range(first[idx], first[idx] + span[idx]))
                assert live <= covered
                if kind == "qk":
                    assert live == covered, (idx, sorted(live), first[idx], span[idx])
            assert np.any(span < tiles.shape[-1]) and np.any(span > 0)


def lower_for_tpu(fn, *args):
    """StableHLO text of fn(*args) (ShapeDtypeStructs) and its vjp, traced and lowered for TPU."""

    def forward_backward(*args):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, *args[3:]), *args[:3])
        return out, vjp(out)

    with target_platform("tpu"), jax.sharding.use_abstract_mesh(V5E):
        lowered = jax.jit(forward_backward).trace(*args).lower(lowering_platforms=("tpu",))
    return lowered.as_text()


@pytest.mark.parametrize("kind", ["qk", "hash"])
@pytest.mark.parametrize("via", ["kernels", "ops auto"])
def test_lowering_for_tpu_calls_the_three_mosaic_kernels(kind, via):
    batch, seq, heads, kv_heads, dim = 1, 1000, 4, 2, 128
    spec = jax.ShapeDtypeStruct
    dtype = jnp.bool_ if kind == "qk" else jnp.int32
    args = (
        spec((batch, seq, heads, dim), jnp.bfloat16),
        spec((batch, seq, kv_heads, dim), jnp.bfloat16),
        spec((batch, seq, kv_heads, dim), jnp.bfloat16),
        spec((batch, seq, heads), dtype),
        spec((batch, seq, kv_heads), dtype),
    )
    if via == "kernels":
        fn = entry(kind)
    else:  # impl='auto' picks the kernels on TPU
        fn = getattr(sparse_ops, f"{kind}_sparse_attention")
    text = lower_for_tpu(fn, *args)
    assert text.count("tpu_custom_call") == 3, text.count("tpu_custom_call")
    for name in ("fwd", "dq", "dkv"):
        assert f"sparse_flash_attention_{name}" in text

"""Sparse-attention Transformer variants: hashing, keep decisions, decoding, training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm_smoke
from jaxlab import models
from jaxlab.models import sparse_attention as sparse
from jaxlab.models.transformer import TransformerConfig, init_cache
from jaxlab.train import loop

BASE = TransformerConfig(
    vocab_size=61,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=64,
)


@pytest.mark.parametrize("kind", ["hash", "qk"])
def test_cached_decoding_equals_the_full_forward(kind):
    """Prefill + token-by-token steps (dense masked path) match the sparse training path."""
    config = dataclasses.replace(
        BASE, sparse_attention=dict(kind=kind, num_buckets=4, keep_rate=0.6)
    )
    model = models.build(config, nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (3, 24)))
    full = model(tokens)
    cache = init_cache(config, 3, 32)
    positions = jnp.broadcast_to(jnp.arange(24), (3, 24))
    logits, cache = model.decode(tokens[:, :10], cache, positions=positions[:, :10])
    steps = [logits]
    for t in range(10, 24):
        logits, cache = model.decode(tokens[:, t : t + 1], cache, positions=positions[:, t : t + 1])
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=1e-4)


def test_sparse_patterns_change_the_model_and_keep_everything_is_dense():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 61, (2, 30)))
    dense = models.build(BASE, nnx.Rngs(0))(tokens)
    keep_all = dataclasses.replace(BASE, sparse_attention=dict(kind="qk", keep_rate=1.0))
    np.testing.assert_allclose(
        np.asarray(models.build(keep_all, nnx.Rngs(0))(tokens)), np.asarray(dense), atol=1e-5
    )
    for pattern in (dict(kind="qk", keep_rate=0.5), dict(kind="hash", num_buckets=4)):
        config = dataclasses.replace(BASE, sparse_attention=pattern)
        assert np.abs(np.asarray(models.build(config, nnx.Rngs(0))(tokens) - dense)).max() > 1e-3


def test_hash_buckets_are_random_projection_argmax_in_float64():
    config = sparse.SparseAttentionConfig(kind="hash", num_buckets=6, seed=3)
    r = sparse.hash_projections(config, layer=2, kv_heads=2, head_dim=16)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(r), axis=1), 1.0, rtol=1e-6)
    x = np.random.default_rng(0).standard_normal((2, 40, 4, 16))
    got = np.asarray(sparse.hash_buckets(jnp.asarray(x, jnp.float32), r))
    proj = np.einsum("bshd,hdn->bshn", x, np.repeat(np.asarray(r, np.float64), 2, axis=0))
    np.testing.assert_array_equal(got, np.argmax(np.concatenate([proj, -proj], -1), -1))
    # Opposite vectors land in opposite buckets; scaling does not move a vector.
    flipped = np.asarray(sparse.hash_buckets(jnp.asarray(-x, jnp.float32), r))
    np.testing.assert_array_equal(flipped, (got + 3) % 6)
    scaled = np.asarray(sparse.hash_buckets(jnp.asarray(5 * x, jnp.float32), r))
    np.testing.assert_array_equal(scaled, got)


def test_keep_decisions_have_the_rate_and_differ_by_layer_head_role():
    config = sparse.SparseAttentionConfig(kind="qk", keep_rate=0.3)
    positions = jnp.broadcast_to(jnp.arange(4096), (2, 4096))
    masks = [
        np.asarray(sparse.keep_mask(config, layer, role, positions, 8))
        for layer in (0, 1)
        for role in (0, 1)
    ]
    for m in masks:
        n = m.size
        assert abs(m.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)
        assert np.array_equal(m[0], m[1])  # a function of the position, not the row
    # Distinct streams: agreement between any two is that of independent coins (0.3^2 + 0.7^2).
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert abs((masks[i] == masks[j]).mean() - 0.58) < 0.02
    heads = masks[0][0]
    assert abs((heads[:, 0] == heads[:, 1]).mean() - 0.58) < 0.03


def test_bad_sparse_configs_are_named():
    with pytest.raises(ValueError, match="kind must be one of"):
        sparse.SparseAttentionConfig(kind="lsh")
    with pytest.raises(ValueError, match="num_buckets must be even and >= 2, got 5"):
        sparse.SparseAttentionConfig(kind="hash", num_buckets=5)
    with pytest.raises(ValueError, match=r"keep_rate must be in \(0, 1\], got 0.0"):
        sparse.SparseAttentionConfig(kind="qk", keep_rate=0.0)
    with pytest.raises(ValueError, match="sparse_attention and sliding_window"):
        dataclasses.replace(BASE, sliding_window=8, sparse_attention=dict(kind="qk"))


@pytest.mark.parametrize("kind", ["hash", "qk"])
def test_tiny_lm_trains_with_sparse_attention_on_eight_devices(tmp_path, kind):
    config = lm_smoke.get_config()
    config.num_steps = 24
    config.seq_len = 64
    config.eval_every = 24
    config.checkpoint_every = 24
    config.mesh.update(data=4, fsdp=1, tensor=2)
    config.model.sparse_attention = dict(kind=kind, num_buckets=4, keep_rate=0.5)
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary.experiment.mesh.size == 8
    losses = [r["loss"] for r in loop.read_metrics(str(tmp_path)) if "loss" in r]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < losses[0] - 0.5
    assert jax.tree.leaves(summary.state.params)  # parameters exist and were trained


@pytest.mark.parametrize("kind", ["hash", "qk"])
def test_the_per_shard_path_computes_the_unsharded_attention(kind, monkeypatch):
    """The path a sharded model takes for the Pallas kernels (shard_map by logical axes, GQA
    groups kept on their device), run here with the XLA path on the 8-device CPU mesh."""
    from jaxlab.models.partitioning import activation_sharding
    from jaxlab.train.sharding import make_mesh

    config = sparse.SparseAttentionConfig(kind=kind, num_buckets=4, keep_rate=0.6, impl="xla")
    rng = np.random.default_rng(7)
    batch, seq, heads, kv_heads, dim = 4, 24, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((batch, seq, heads, dim)), jnp.float32)
    k, v = (
        jnp.asarray(rng.standard_normal((batch, seq, kv_heads, dim)), jnp.float32) for _ in "kv"
    )
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    segments = jnp.asarray(np.repeat([[1] * 16 + [2] * 8], batch, axis=0), jnp.int32)
    for segment_ids in (None, segments):
        want = sparse.sparse_attention(config, 1, q, k, v, positions, segment_ids)
        monkeypatch.setattr(sparse.sparse_ops, "needs_per_shard", lambda impl: True)
        mesh = make_mesh(data=2, fsdp=2, tensor=2)
        with activation_sharding(mesh):
            run = jax.jit(lambda *a: sparse.sparse_attention(config, 1, *a))
            text = str(jax.make_jaxpr(run)(q, k, v, positions, segment_ids))
            got = run(q, k, v, positions, segment_ids)
        monkeypatch.undo()
        assert "shard_map" in text
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)

"""DenseFormer: identity at init, the DWA definition in float64 NumPy, decoding and sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab import models, optim
from jaxlab.infer import decode_step, prefill
from jaxlab.interop.hf import CheckpointError, save_hf_llama
from jaxlab.models.denseformer import DepthWeightedAverages, DWAConfig, dwa_inputs

BASE = models.TransformerConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=6,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=64,
)
VARIANTS = [(1, 1), (2, 1), (1, 2), (2, 3), (4, 5)]


def _randomize_dwa(model, seed):
    rng = np.random.default_rng(seed)
    for w in model.dwa.weights:
        w[...] = jnp.asarray(rng.normal(0.3, 0.5, w.shape), jnp.float32)


@pytest.mark.parametrize("k, p", VARIANTS)
def test_untrained_denseformer_is_the_transformer(k, p):
    base = models.build(BASE, nnx.Rngs(0))
    dense = models.build(dataclasses.replace(BASE, dwa=DWAConfig(k, p)), nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 61, (2, 9)))
    np.testing.assert_array_equal(np.asarray(dense(tokens)), np.asarray(base(tokens)))


def numpy_dense_forward(x0, weights, alphas, k, p):
    """The definition: X_i = tanh(Y_{i-1} W_i); after blocks i = 0 mod p,
    Y_i = sum_{j <= i, j = i mod k} alpha_ij X_j."""
    xs, y, n = [x0], x0, 0
    for i, w in enumerate(weights, start=1):
        x = np.tanh(y @ w)
        xs.append(x)
        if i % p == 0:
            js = [j for j in range(i + 1) if j % k == i % k]
            y = sum(a * xs[j] for a, j in zip(alphas[n], js, strict=True))
            n += 1
        else:
            y = x
    return y


@pytest.mark.parametrize("k, p", VARIANTS)
def test_dwa_matches_the_definition_in_float64(k, p):
    rng = np.random.default_rng(k * 10 + p)
    layers = 7
    dwa = DepthWeightedAverages(layers, DWAConfig(k, p))
    alphas = [rng.normal(size=w.shape) for w in dwa.weights]
    for w, a in zip(dwa.weights, alphas, strict=True):
        w[...] = jnp.asarray(a, jnp.float32)
    x0 = rng.normal(size=(3, 5, 8))
    weights = [rng.normal(size=(8, 8)) / 3 for _ in range(layers)]
    blocks = [lambda y, w=w: jnp.tanh(y @ jnp.asarray(w, jnp.float32)) for w in weights]
    got = dwa(jnp.asarray(x0, jnp.float32), blocks)
    want = numpy_dense_forward(x0, weights, alphas, k, p)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_gradients_reach_every_dwa_weight():
    model = models.build(dataclasses.replace(BASE, dwa=DWAConfig(2, 1)), nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 61, (2, 9)))
    grads = jax.grad(lambda p: nnx.merge(graphdef, p)(tokens).mean())(params)
    for g in nnx.to_pure_dict(grads)["dwa"]["weights"].values():
        assert np.abs(np.asarray(g)).min() > 0


def test_cached_decoding_equals_full_forward():
    model = models.build(dataclasses.replace(BASE, dwa=DWAConfig(2, 3)), nnx.Rngs(3))
    _randomize_dwa(model, 4)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 61, (2, 12)))
    full = np.asarray(model(tokens))
    cache = models.init_cache(model.config, 2, 12)
    logits, cache = prefill(model, tokens[:, :5], cache)
    cached = [np.asarray(logits)]
    for t in range(5, 12):
        step_logits, cache = decode_step(model, tokens[:, t], jnp.full((2,), t), cache)
        cached.append(np.asarray(step_logits)[:, None])
    np.testing.assert_allclose(np.concatenate(cached, axis=1), full, atol=1e-4)


def test_weight_matrix_layout():
    dwa = DepthWeightedAverages(6, DWAConfig(2, 3))
    matrix = dwa.weight_matrix()
    assert matrix.shape == (2, 7)  # DWAs after blocks 3 and 6
    np.testing.assert_array_equal(
        np.flatnonzero(~np.isnan(matrix[0])), dwa_inputs(3, DWAConfig(2, 3))
    )
    np.testing.assert_array_equal(matrix[1][~np.isnan(matrix[1])], [0, 0, 0, 1])


def test_dwa_weights_skip_weight_decay_unless_asked():
    model = models.build(dataclasses.replace(BASE, dwa=DWAConfig(1, 1)), nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert not any(jax.tree.leaves(optim.decay_mask(params)["dwa"]))
    assert all(jax.tree.leaves(optim.decay_mask(params, decay_dwa=True)["dwa"]))


def test_bad_dwa_config_and_export_are_named(tmp_path):
    with pytest.raises(ValueError, match="dwa.dilation must be a positive int, got 0"):
        dataclasses.replace(BASE, dwa=dict(dilation=0, period=1))
    model = models.build(dataclasses.replace(BASE, dwa=DWAConfig(1, 1)), nnx.Rngs(0))
    with pytest.raises(CheckpointError, match="DenseFormer"):
        save_hf_llama(model, str(tmp_path))

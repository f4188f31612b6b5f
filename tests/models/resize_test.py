"""resize_vocabulary: old ids keep their parameters and logits, new ids get mean/normal rows."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab import models
from jaxlab.models import MambaConfig, TransformerConfig
from jaxlab.models.layers import logical_axes
from jaxlab.models.resize import resize_vocabulary

TRANSFORMER = TransformerConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
MAMBA = MambaConfig(
    vocab_size=53,
    hidden_size=32,
    num_layers=2,
    state_size=8,
    head_dim=16,
    chunk_size=8,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=64,
    mixer="mamba2",
    num_groups=2,
)
CONFIGS = {
    "transformer untied": TRANSFORMER,
    "transformer tied": dataclasses.replace(TRANSFORMER, tie_embeddings=True),
    "mamba untied": MAMBA,
    "mamba tied": dataclasses.replace(MAMBA, tie_embeddings=True),
}

# XLA's default CPU matmul (the YNNPACK fusion) picks its kernel by the output width, so a
# [.., vocab] projection and a [.., vocab + k] one can round differently in the last bit even
# though every column is the same dot product. Compiled without that fusion, XLA's own dot
# computes each column independently of the width, which lets the test ask for bitwise equality.
WIDTH_INDEPENDENT_DOT = {"xla_cpu_experimental_ynn_fusion_type": ""}


def logits(model, tokens, compiler_options=None):
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t), compiler_options=compiler_options)
    return np.asarray(forward(state, tokens))


def params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("extra", [1, 32])
def test_old_logits_unchanged_bitwise(name, extra):
    config = CONFIGS[name]
    model = models.build(config, nnx.Rngs(extra))
    old_vocab = config.vocab_size
    init = "mean" if extra == 1 else "normal"
    resized = resize_vocabulary(model, old_vocab + extra, init=init, rng=extra)
    tokens = jax.random.randint(jax.random.key(extra), (3, 11), 0, old_vocab)
    before = logits(model, tokens, WIDTH_INDEPENDENT_DOT)
    after = logits(resized, tokens, WIDTH_INDEPENDENT_DOT)
    assert after.shape == (3, 11, old_vocab + extra)
    np.testing.assert_array_equal(after[..., :old_vocab], before)
    # With the default kernels the old logits agree to float32 rounding.
    np.testing.assert_allclose(
        logits(resized, tokens)[..., :old_vocab], logits(model, tokens), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameters_copied_and_new_rows_are_the_mean(name):
    config = CONFIGS[name]
    model = models.build(config, nnx.Rngs(3))
    old = params(model)
    new_vocab = config.vocab_size + 5
    resized = resize_vocabulary(model, new_vocab)  # init="mean" needs no rng
    new = params(resized)
    assert resized.config == dataclasses.replace(config, vocab_size=new_vocab)
    assert model.config.vocab_size == config.vocab_size  # the input model is untouched
    assert params(model)["embed"].shape == (config.vocab_size, config.hidden_size)

    embed = np.asarray(new["embed"])
    assert embed.shape == (new_vocab, config.hidden_size)
    np.testing.assert_array_equal(embed[: config.vocab_size], np.asarray(old["embed"]))
    mean = np.asarray(old["embed"], np.float64).mean(axis=0)
    for row in embed[config.vocab_size :]:
        np.testing.assert_allclose(row, mean, rtol=1e-5, atol=1e-7)
    if config.tie_embeddings:
        assert "lm_head" not in new
    else:
        head = np.asarray(new["lm_head"])
        assert head.shape == (config.hidden_size, new_vocab)
        np.testing.assert_array_equal(head[:, : config.vocab_size], np.asarray(old["lm_head"]))
        column_mean = np.asarray(old["lm_head"], np.float64).mean(axis=1)
        for column in head[:, config.vocab_size :].T:
            np.testing.assert_allclose(column, column_mean, rtol=1e-5, atol=1e-7)

    def rest(p):
        return {k: v for k, v in p.items() if k not in ("embed", "lm_head")}

    jax.tree.map(np.testing.assert_array_equal, rest(new), rest(old))
    # Logical axes and dtypes are kept.
    assert logical_axes(nnx.state(resized, nnx.Param)) == logical_axes(nnx.state(model, nnx.Param))
    assert jax.tree.map(lambda x: x.dtype, new) == jax.tree.map(lambda x: x.dtype, old)


def test_normal_init_is_seeded_with_the_models_std():
    config = dataclasses.replace(TRANSFORMER, initializer_range=0.5)
    model = models.build(config, nnx.Rngs(0))
    extra = 400
    a = params(resize_vocabulary(model, 96 + extra, init="normal", rng=jax.random.key(7)))
    b = params(resize_vocabulary(model, 96 + extra, init="normal", rng=jax.random.key(7)))
    c = params(resize_vocabulary(model, 96 + extra, init="normal", rng=8))
    np.testing.assert_array_equal(a["embed"], b["embed"])
    assert not np.array_equal(a["embed"][96:], c["embed"][96:])
    for new_rows in (np.asarray(a["embed"][96:]), np.asarray(a["lm_head"][:, 96:])):
        assert abs(new_rows.std() - 0.5) < 0.02 and abs(new_rows.mean()) < 0.02
    assert not np.array_equal(a["embed"][96:], np.asarray(a["lm_head"][:, 96:]).T)


def test_bfloat16_parameters_stay_bfloat16():
    config = dataclasses.replace(TRANSFORMER, param_dtype="bfloat16", dtype="bfloat16")
    model = models.build(config, nnx.Rngs(0))
    resized = resize_vocabulary(model, 100)
    assert resized.embed[...].dtype == jnp.bfloat16
    assert resized.lm_head[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(resized.embed[...][:96], np.float32), np.asarray(model.embed[...], np.float32)
    )


@pytest.mark.parametrize("name", ["transformer untied", "mamba tied"])
def test_shrinking_keeps_the_first_ids(name):
    config = CONFIGS[name]
    model = models.build(config, nnx.Rngs(1))
    kept = config.vocab_size - 7
    resized = resize_vocabulary(model, kept)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, kept)
    np.testing.assert_array_equal(
        logits(resized, tokens, WIDTH_INDEPENDENT_DOT),
        logits(model, tokens, WIDTH_INDEPENDENT_DOT)[..., :kept],
    )


def test_resized_model_trains_and_round_trips_through_split_merge():
    model = resize_vocabulary(models.build(TRANSFORMER, nnx.Rngs(0)), 98)
    tokens = jnp.array([[1, 96, 97, 5]])
    grads = nnx.jit(nnx.grad(lambda m: m(tokens)[0, -1, 97]))(model)
    assert grads["embed"][...].shape == (98, 32)
    assert float(jnp.abs(grads["embed"][...][97]).sum()) > 0  # the new row gets a gradient
    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(logits(nnx.merge(graphdef, state), tokens), logits(model, tokens))


def test_bad_arguments():
    model = models.build(TRANSFORMER, nnx.Rngs(0))
    with pytest.raises(ValueError, match="new_vocab_size must be a positive int, got 0"):
        resize_vocabulary(model, 0)
    with pytest.raises(ValueError, match="new_vocab_size must be a positive int, got 97.0"):
        resize_vocabulary(model, 97.0)
    with pytest.raises(ValueError, match=r"init must be one of \('mean', 'normal'\), got 'zero'"):
        resize_vocabulary(model, 97, init="zero")
    with pytest.raises(ValueError, match='init="normal" needs rng'):
        resize_vocabulary(model, 97, init="normal")
    with pytest.raises(ValueError, match="dataclass config with vocab_size"):
        resize_vocabulary(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), 4)

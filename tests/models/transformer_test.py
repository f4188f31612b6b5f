"""The Llama-family Transformer: configs, registry, dtypes and sharded execution."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxlab import models
from jaxlab.interop.hf import load_hf_llama
from jaxlab.models import TransformerConfig
from jaxlab.train.sharding import make_mesh, state_shardings
from tests.hf_utils import hf_logits, make_hf_model

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4)


def test_build_from_config_dict():
    cfg = ml_collections.ConfigDict(dict(name="llama", num_kv_heads=2, **TINY))
    model = models.build(cfg, nnx.Rngs(0))
    assert model.config.num_kv_heads == 2
    assert model(jnp.zeros((1, 5), jnp.int32)).shape == (1, 5, 96)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_kv_heads=3), "num_heads=4 must be a multiple of num_kv_heads=3"),
        (dict(hidden_size=0), "hidden_size must be a positive int, got 0"),
        (dict(dtype="float8"), "dtype must be one of"),
        (dict(attention_impl="flash9000"), "attention_impl must be one of"),
        (dict(head_dim=7), "head_dim must be even"),
    ],
)
def test_bad_config_fields_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{**TINY, **changes})


def test_unknown_field_and_unknown_model():
    with pytest.raises(ValueError, match=r"unknown fields \['num_layer'\]"):
        models.build(dict(name="llama", num_layer=2, **TINY), nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"config.name must be one of \(.*\), got 'gpt'"):
        models.build(dict(TINY, name="gpt"), nnx.Rngs(0))


def test_too_long_sequence_is_an_error():
    model = models.build(TransformerConfig(**TINY, max_seq_len=8), nnx.Rngs(0))
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_seq_len=8"):
        model(jnp.zeros((1, 9), jnp.int32))


def test_parameters_carry_logical_axes():
    model = models.build(TransformerConfig(**TINY, num_kv_heads=2), nnx.Rngs(0))
    axes = models.layers.logical_axes(nnx.state(model, nnx.Param))
    assert axes["layers"][0]["attn"]["k_proj"] == ("embed", "kv_heads", "head_dim")
    assert axes["embed"] == ("vocab", "embed")
    assert all(a is not None for a in jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)))


def test_bfloat16_compute_with_float32_params(tmp_path):
    hf_model = make_hf_model("gqa_untied")
    hf_model.save_pretrained(str(tmp_path))
    model = load_hf_llama(str(tmp_path), dtype="float32", compute_dtype="bfloat16")
    assert model.embed[...].dtype == jnp.float32
    tokens = np.random.default_rng(0).integers(0, 97, (2, 16))
    logits = np.asarray(model(jnp.asarray(tokens)))
    assert logits.dtype == np.float32
    ref = hf_logits(hf_model, tokens)
    assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("mesh_shape", [dict(data=4, tensor=2), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_forward_equals_single_device(tmp_path, mesh_shape):
    assert jax.device_count() == 8
    hf_model = make_hf_model("gqa_untied", vocab_size=128)
    hf_model.save_pretrained(str(tmp_path))
    model = load_hf_llama(str(tmp_path))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, (8, 16)))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    single = np.asarray(forward(state, tokens))

    mesh = make_mesh(**mesh_shape)
    shardings = state_shardings(state, mesh)
    sharded_state = jax.device_put(nnx.to_pure_dict(state), shardings)
    # The tensor-parallel axes really are split.
    q_proj = sharded_state["layers"][0]["attn"]["q_proj"]
    expected = ("fsdp" if mesh_shape.get("fsdp", 1) > 1 else None, "tensor", None)
    assert q_proj.sharding.spec == PartitionSpec(*expected)
    state_copy = nnx.State(state)
    nnx.replace_by_pure_dict(state_copy, sharded_state)
    batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    sharded = forward(state_copy, jax.device_put(tokens, batch_sharding))
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-4)
    np.testing.assert_allclose(single, hf_logits(hf_model, np.asarray(tokens)), atol=1e-4)


def test_remat_gives_the_same_gradients_and_recomputes():
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 96, (2, 8)))

    def grads_and_jaxpr(remat, dwa):
        config = TransformerConfig(**TINY, remat=remat, dwa=dwa)
        graphdef, params = nnx.split(models.build(config, nnx.Rngs(0)), nnx.Param)

        def loss(p):
            return nnx.merge(graphdef, p)(tokens).mean()

        return jax.grad(loss)(params), str(jax.make_jaxpr(jax.grad(loss))(params))

    for dwa in (None, {"dilation": 1, "period": 1}):
        plain, plain_jaxpr = grads_and_jaxpr(False, dwa)
        remat, remat_jaxpr = grads_and_jaxpr(True, dwa)
        assert "remat" in remat_jaxpr and "remat" not in plain_jaxpr
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)

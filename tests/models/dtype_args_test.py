"""Model dtype arguments take what ``jnp.dtype`` takes and normalise to one canonical name."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab import models
from jaxlab.models import MambaConfig, TransformerConfig
from jaxlab.models import mamba as mamba_lib
from jaxlab.models import transformer as transformer_lib
from jaxlab.models.resize import resize_vocabulary

TRANSFORMER = dict(
    vocab_size=37,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=32,
)
MAMBA = dict(
    vocab_size=37,
    hidden_size=32,
    num_layers=2,
    state_size=8,
    head_dim=16,
    chunk_size=8,
    mixer="mamba2",
    attention_layers=(1,),
    intermediate_size=48,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=32,
)
FAMILIES = {
    "transformer": (TransformerConfig, TRANSFORMER, transformer_lib.init_cache),
    "mamba": (MambaConfig, MAMBA, mamba_lib.init_cache),
}
FLOAT32 = [jnp.float32, np.float32, "float32", np.dtype("float32"), jnp.dtype("float32")]
BFLOAT16 = [jnp.bfloat16, "bfloat16", jnp.dtype("bfloat16")]


def _logits(config):
    model = models.build(config, nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 9)))
    return np.asarray(model(tokens).astype(jnp.float32))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_dtype_forms_are_one_config(family):
    cls, fields, _ = FAMILIES[family]
    configs = [cls(**fields, param_dtype=d, dtype=d) for d in FLOAT32]
    for config in configs:
        assert config.param_dtype == "float32" and config.dtype == "float32"
        assert config == configs[0] and hash(config) == hash(configs[0])
        json.dumps(config.to_dict())  # still serialises
        assert cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    ref = _logits(configs[0])
    for config in configs[1:3]:  # jnp.float32, np.float32 against "float32"
        np.testing.assert_array_equal(_logits(config), ref)
    mixed = [cls(**fields, param_dtype=d, dtype=jnp.float32) for d in BFLOAT16]
    assert all(c.param_dtype == "bfloat16" and c == mixed[0] for c in mixed)
    assert mixed[0].storage_dtype == jnp.bfloat16
    # dataclasses.replace and from_dict go through the same normalisation.
    assert dataclasses.replace(configs[0], dtype=jnp.bfloat16).dtype == "bfloat16"
    assert cls.from_dict({**fields, "param_dtype": np.float16}).param_dtype == "float16"


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("field", ["param_dtype", "dtype"])
@pytest.mark.parametrize("bad", [jnp.int32, np.float64, "float64", "int8", None, "abc", True])
def test_unsupported_config_dtypes_are_named(family, field, bad):
    cls, fields, _ = FAMILIES[family]
    message = rf"{cls.__name__}\.{field} must be one of \('float32', 'bfloat16', 'float16'\)"
    with pytest.raises(ValueError, match=message) as info:
        cls(**fields, **{field: bad})
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_init_cache_dtype_forms(family):
    cls, fields, init_cache = FAMILIES[family]
    config = cls(**fields)
    caches = [
        init_cache(config, 2, 8, dtype=d) for d in (jnp.bfloat16, np.dtype("bfloat16"), "bfloat16")
    ]
    for cache in caches[1:]:
        assert jax.tree.structure(cache) == jax.tree.structure(caches[0])
        for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(caches[0]), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
    assert jax.tree.leaves(caches[0])[0].dtype == jnp.bfloat16
    f32 = [init_cache(config, 2, 8, dtype=d) for d in (jnp.float32, np.float32, "float32")]
    assert all(leaf.dtype == jnp.float32 for cache in f32 for leaf in jax.tree.leaves(cache))


def test_resize_keeps_a_dtype_given_as_jnp_type():
    config = TransformerConfig(**TRANSFORMER, param_dtype=jnp.bfloat16)
    model = models.build(config, nnx.Rngs(0))
    resized = resize_vocabulary(model, 40)
    assert resized.config == dataclasses.replace(config, vocab_size=40)
    assert resized.config.param_dtype == "bfloat16"
    assert resized.embed[...].dtype == jnp.bfloat16

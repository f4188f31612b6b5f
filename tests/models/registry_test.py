"""The model registry: built-in families, a user-registered family, names in errors."""

import dataclasses

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxlab import models
from jaxlab.registry import Registry


@dataclasses.dataclass(frozen=True)
class EchoConfig:
    name: str = "echo"
    vocab_size: int = 5

    @classmethod
    def from_dict(cls, values):
        return cls(**values)


class Echo(nnx.Module):
    """One-hot logits of the input tokens."""

    def __init__(self, config, *, rngs):
        del rngs
        self.config = config

    def __call__(self, tokens):
        return jnp.eye(self.config.vocab_size)[tokens]


def echo_cache(config, batch, max_len):
    return jnp.zeros((batch, max_len), jnp.int32)


@pytest.fixture
def registry(monkeypatch):
    fresh = Registry("model", field="config.name")
    for name in models.MODELS:
        fresh.register(name, models.MODELS.get(name))
    monkeypatch.setattr(models, "MODELS", fresh)
    return fresh


def test_builtin_families():
    assert models.MODELS.names() == ("cotformer", "llama", "mamba")
    assert models.MODELS.get("llama").config_cls is models.TransformerConfig
    assert models.MODELS.get("mamba").module_cls is models.MambaLM


def test_registered_family_is_built_configured_and_cached(registry):
    models.register("echo", EchoConfig, Echo, echo_cache)
    model = models.build({"name": "echo", "vocab_size": 3}, nnx.Rngs(0))
    assert isinstance(model, Echo) and model.config == EchoConfig(vocab_size=3)
    assert models.make_config(EchoConfig()) == EchoConfig()
    assert models.make_cache({"name": "echo"}, 2, 7).shape == (2, 7)
    assert model(jnp.asarray([2, 0])).tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="'echo' is already registered"):
        models.register("echo", EchoConfig, Echo, echo_cache)
    models.register("echo", EchoConfig, Echo, lambda c, b, n: None, replace=True)
    assert models.make_cache({"name": "echo"}, 2, 7) is None
    with pytest.raises(
        ValueError, match=r"config.name must be one of \('cotformer', 'echo', 'llama', 'mamba'\)"
    ):
        models.build({"name": "gpt"}, nnx.Rngs(0))

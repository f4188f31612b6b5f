"""Model families, built from their configs through a registry keyed by ``config.name``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from jaxlab.models import mamba, transformer
from jaxlab.models.layers import HiddenStates
from jaxlab.models.mamba import MambaConfig, MambaLM
from jaxlab.models.transformer import (
    KVCache,
    LayerCache,
    Transformer,
    TransformerConfig,
    init_cache,
)

# name -> (config class, module class, decoding-cache factory)
_REGISTRY: dict[str, tuple[type, Callable[..., nnx.Module], Callable[..., Any]]] = {
    "llama": (TransformerConfig, Transformer, transformer.init_cache),
    "mamba": (MambaConfig, MambaLM, mamba.init_cache),
}


def register(
    name: str,
    config_cls: type,
    module_cls: Callable[..., nnx.Module],
    cache_factory: Callable[..., Any],
) -> None:
    """Makes ``build`` construct ``module_cls`` for configs whose ``name`` is ``name``, and
    :func:`make_cache` call ``cache_factory(config, batch, max_len)``."""
    _REGISTRY[name] = (config_cls, module_cls, cache_factory)


def make_cache(config: Any, batch: int, max_len: int):
    """An empty decoding cache (KV caches, recurrent states) for the model of ``config``."""
    config = make_config(config)
    return _REGISTRY[config.name][2](config, batch, max_len)


def make_config(config: Any) -> Any:
    """The config dataclass named by ``config.name`` (a dataclass passes through; a mapping, such
    as an ``ml_collections.ConfigDict``, is converted, with unknown fields an error)."""
    name = config["name"] if isinstance(config, Mapping) else getattr(config, "name", None)
    if name not in _REGISTRY:
        raise ValueError(f"models: config.name={name!r} is not one of {sorted(_REGISTRY)}")
    config_cls = _REGISTRY[name][0]
    if isinstance(config, config_cls):
        return config
    mapping = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return config_cls.from_dict(mapping)


def build(config: Any, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model named by ``config.name``.

    Args:
      config: a model config dataclass, or a mapping (e.g. ``ml_collections.ConfigDict``) with a
        ``name`` key and the config's fields.
      rngs: parameter initialisation keys.
    """
    config = make_config(config)
    return _REGISTRY[config.name][1](config, rngs=rngs)


__all__ = [
    "HiddenStates",
    "KVCache",
    "MambaConfig",
    "MambaLM",
    "make_cache",
    "make_config",
    "LayerCache",
    "Transformer",
    "TransformerConfig",
    "build",
    "init_cache",
    "register",
]

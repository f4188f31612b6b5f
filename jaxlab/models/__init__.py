"""Model families, built from their configs through a registry keyed by ``config.name``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from jaxlab.models.transformer import (
    KVCache,
    LayerCache,
    Transformer,
    TransformerConfig,
    init_cache,
)

# name -> (config class, module class)
_REGISTRY: dict[str, tuple[type, Callable[..., nnx.Module]]] = {
    "llama": (TransformerConfig, Transformer),
}


def register(name: str, config_cls: type, module_cls: Callable[..., nnx.Module]) -> None:
    """Makes ``build`` construct ``module_cls`` for configs whose ``name`` is ``name``."""
    _REGISTRY[name] = (config_cls, module_cls)


def build(config: Any, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model named by ``config.name``.

    Args:
      config: a model config dataclass, or a mapping (e.g. ``ml_collections.ConfigDict``) with a
        ``name`` key and the config's fields.
      rngs: parameter initialisation keys.
    """
    name = config["name"] if isinstance(config, Mapping) else getattr(config, "name", None)
    if name not in _REGISTRY:
        raise ValueError(f"models.build: config.name={name!r} is not one of {sorted(_REGISTRY)}")
    config_cls, module_cls = _REGISTRY[name]
    if not isinstance(config, config_cls):
        mapping = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        config = config_cls.from_dict(mapping)
    return module_cls(config, rngs=rngs)


__all__ = [
    "KVCache",
    "LayerCache",
    "Transformer",
    "TransformerConfig",
    "build",
    "init_cache",
    "register",
]

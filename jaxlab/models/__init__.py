"""Model families, built from their configs through a registry keyed by ``config.name``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from flax import nnx

from jaxlab.models import cotformer, depth, mamba, transformer
from jaxlab.models.cotformer import CoTFormer, CoTFormerConfig
from jaxlab.models.depth import (
    layer_parallel,
    merge_layers,
    prune_by_angular_distance,
    prune_layers,
    shuffle_layers,
)
from jaxlab.models.interface import Cache, LanguageModel, LayerCache, MixerCache
from jaxlab.models.layers import HiddenStates
from jaxlab.models.mamba import MambaConfig, MambaLM
from jaxlab.models.transformer import (
    Transformer,
    TransformerConfig,
    init_cache,
)
from jaxlab.registry import Registry


class ModelEntry(NamedTuple):
    """What the registry keeps for one model family."""

    config_cls: type
    module_cls: Callable[..., nnx.Module]
    cache_factory: Callable[..., Any]  # (config, batch, max_len) -> empty decoding cache


MODELS: Registry[ModelEntry] = Registry("model", field="config.name")
MODELS.register("llama", ModelEntry(TransformerConfig, Transformer, transformer.init_cache))
MODELS.register("mamba", ModelEntry(MambaConfig, MambaLM, mamba.init_cache))
MODELS.register("cotformer", ModelEntry(CoTFormerConfig, CoTFormer, cotformer.init_cache))


def register(
    name: str,
    config_cls: type,
    module_cls: Callable[..., nnx.Module],
    cache_factory: Callable[..., Any],
    *,
    replace: bool = False,
) -> None:
    """Makes ``build`` construct ``module_cls`` for configs whose ``name`` is ``name``, and
    :func:`make_cache` call ``cache_factory(config, batch, max_len)``; ``replace=True`` to
    override a registered family."""
    MODELS.register(name, ModelEntry(config_cls, module_cls, cache_factory), replace=replace)


def make_cache(config: Any, batch: int, max_len: int):
    """An empty decoding cache (KV caches, recurrent states) for the model of ``config``."""
    config = make_config(config)
    return MODELS.get(config.name).cache_factory(config, batch, max_len)


def make_config(config: Any) -> Any:
    """The config dataclass named by ``config.name`` (a dataclass passes through; a mapping, such
    as an ``ml_collections.ConfigDict``, is converted, with unknown fields an error)."""
    name = config["name"] if isinstance(config, Mapping) else getattr(config, "name", None)
    config_cls = MODELS.get(name).config_cls
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
    return MODELS.get(config.name).module_cls(config, rngs=rngs)


__all__ = [
    "HiddenStates",
    "Cache",
    "CoTFormer",
    "CoTFormerConfig",
    "MODELS",
    "ModelEntry",
    "MambaConfig",
    "MambaLM",
    "make_cache",
    "make_config",
    "LanguageModel",
    "LayerCache",
    "MixerCache",
    "Transformer",
    "TransformerConfig",
    "build",
    "depth",
    "init_cache",
    "layer_parallel",
    "merge_layers",
    "prune_by_angular_distance",
    "prune_layers",
    "register",
    "shuffle_layers",
]

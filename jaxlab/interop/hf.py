"""Hugging Face Llama-family checkpoints (``config.json`` + safetensors) <-> jaxlab models.

Supported ``model_type``: ``llama`` and ``mistral`` (sliding-window attention). Weights are read
from ``model.safetensors`` or from the shards listed in ``model.safetensors.index.json``; only
safetensors are read, never pickles.

Rotary layout: Hugging Face stores q/k projections permuted for the half-split rotation
(dimension ``i`` pairs with ``i + head_dim/2``); jaxlab rotates in that same layout, so the
projections map over with a transpose and reshape only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from jaxlab.models.layers import RopeScaling
from jaxlab.models.transformer import DTYPES, Transformer, TransformerConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# Config keys read here, and keys that carry no architectural meaning for inference.
_IGNORED_CONFIG_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "pad_token_id", "attention_dropout", "pretraining_tp", "output_attentions",
    "output_hidden_states", "return_dict", "_name_or_path", "tokenizer_class",
    "_attn_implementation_autoset",
}  # fmt: skip
_CONFIG_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias",
    "mlp_bias", "sliding_window", "bos_token_id", "eos_token_id", "max_window_layers",
    "use_sliding_window",
}  # fmt: skip
# Non-parameter buffers some exporters wrote into checkpoints.
_IGNORED_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that does not fit a jaxlab model."""


# --------------------------------------------------------------------------------------------
# Config


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """Translates a Hugging Face ``config.json`` mapping into a :class:`TransformerConfig`.

    Raises:
      CheckpointError: naming the field, for anything jaxlab cannot represent exactly.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"config.json: model_type={model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
        )
    unknown = sorted(set(hf) - _CONFIG_KEYS - _IGNORED_CONFIG_KEYS)
    if unknown:
        raise CheckpointError(f"config.json: unsupported fields {unknown}")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act={hf['hidden_act']!r} (only 'silu')")

    # Transformers < 5 wrote rope_theta + rope_scaling; 5.x writes rope_parameters.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError("config.json: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        scaling = None
    elif rope_type in ("linear", "llama3"):
        allowed = {f.name for f in dataclasses.fields(RopeScaling)} - {"type"}
        extra = sorted(set(rope) - allowed)
        if extra:
            raise CheckpointError(f"config.json: unsupported rope scaling fields {extra}")
        try:
            scaling = RopeScaling(type=rope_type, **rope)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json: rope scaling {rope}: {e}") from e
    else:
        raise CheckpointError(
            f"config.json: rope type {rope_type!r} is not supported (default, linear, llama3)"
        )

    sliding_window = hf.get("sliding_window") if model_type == "mistral" else None
    if hf.get("use_sliding_window") is False:
        sliding_window = None
    eos = hf.get("eos_token_id")
    values = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=sliding_window,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )
    values.update(overrides)
    return TransformerConfig(**values)


def config_to_hf(config: TransformerConfig, dtype: str) -> dict[str, Any]:
    """The ``config.json`` mapping for ``config`` (inverse of :func:`config_from_hf`)."""
    model_type = "mistral" if config.sliding_window is not None else "llama"
    if model_type == "mistral" and (config.attention_bias or config.mlp_bias):
        raise CheckpointError(
            "save_hf_llama: a sliding-window model exports as Mistral, which has no "
            f"attention_bias/mlp_bias (got {config.attention_bias}/{config.mlp_bias})"
        )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope.update(rope_type=s.type, factor=s.factor)
        if s.type == "llama3":
            rope.update(
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings,
            )
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": (
            list(config.eos_token_id)
            if isinstance(config.eos_token_id, tuple)
            else config.eos_token_id
        ),
        "dtype": dtype,
    }
    if model_type == "mistral":
        hf["sliding_window"] = config.sliding_window
    else:
        hf["attention_bias"] = config.attention_bias
        hf["mlp_bias"] = config.mlp_bias
    return hf


# --------------------------------------------------------------------------------------------
# Weights: one table maps every parameter path to its Hugging Face key and layout.


@dataclasses.dataclass(frozen=True)
class _Entry:
    hf_key: str
    path: tuple[str | int, ...]  # path in nnx.state(model)
    hf_shape: tuple[int, ...]
    to_jax: Callable[[jax.Array], jax.Array]  # HF layout -> ours
    to_hf: Callable[[jax.Array], jax.Array]  # ours -> HF layout


def _weight_table(c: TransformerConfig) -> list[_Entry]:
    E, H, K, D, M, V = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                        c.intermediate_size, c.vocab_size)  # fmt: skip
    same = lambda x: x
    table = [_Entry("model.embed_tokens.weight", ("embed",), (V, E), same, same),
             _Entry("model.norm.weight", ("final_norm", "scale"), (E,), same, same)]  # fmt: skip
    if not c.tie_embeddings:
        table.append(_Entry("lm_head.weight", ("lm_head",), (V, E), jnp.transpose, jnp.transpose))

    def in_proj(heads):  # [heads*D, E] <-> [E, heads, D]
        return (lambda w: w.T.reshape(E, heads, D), lambda w: w.reshape(E, heads * D).T)

    def head_bias(heads):  # [heads*D] <-> [heads, D]
        return (lambda b: b.reshape(heads, D), lambda b: b.reshape(heads * D))

    out_proj = (lambda w: w.T.reshape(H, D, E), lambda w: w.reshape(H * D, E).T)
    for i in range(c.num_layers):
        p, layer = f"model.layers.{i}.", ("layers", i)
        table += [
            _Entry(p + "input_layernorm.weight", (*layer, "input_norm", "scale"), (E,), same, same),
            _Entry(p + "post_attention_layernorm.weight", (*layer, "post_attention_norm", "scale"),
                   (E,), same, same),
            _Entry(p + "self_attn.q_proj.weight", (*layer, "attn", "q_proj"), (H * D, E),
                   *in_proj(H)),
            _Entry(p + "self_attn.k_proj.weight", (*layer, "attn", "k_proj"), (K * D, E),
                   *in_proj(K)),
            _Entry(p + "self_attn.v_proj.weight", (*layer, "attn", "v_proj"), (K * D, E),
                   *in_proj(K)),
            _Entry(p + "self_attn.o_proj.weight", (*layer, "attn", "o_proj"), (E, H * D),
                   *out_proj),
            _Entry(p + "mlp.gate_proj.weight", (*layer, "mlp", "gate_proj"), (M, E),
                   jnp.transpose, jnp.transpose),
            _Entry(p + "mlp.up_proj.weight", (*layer, "mlp", "up_proj"), (M, E),
                   jnp.transpose, jnp.transpose),
            _Entry(p + "mlp.down_proj.weight", (*layer, "mlp", "down_proj"), (E, M),
                   jnp.transpose, jnp.transpose),
        ]  # fmt: skip
        if c.attention_bias:
            for name, heads in (("q", H), ("k", K), ("v", K)):
                table.append(_Entry(p + f"self_attn.{name}_proj.bias",
                                    (*layer, "attn", f"{name}_bias"), (heads * D,),
                                    *head_bias(heads)))  # fmt: skip
            table.append(_Entry(p + "self_attn.o_proj.bias", (*layer, "attn", "o_bias"), (E,),
                                same, same))  # fmt: skip
        if c.mlp_bias:
            for name, size in (("gate", M), ("up", M), ("down", E)):
                table.append(_Entry(p + f"mlp.{name}_proj.bias", (*layer, "mlp", f"{name}_bias"),
                                    (size,), same, same))  # fmt: skip
    return table


def _weight_files(path: str) -> dict[str, str]:
    """Maps each tensor name to the safetensors file that holds it."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise CheckpointError(
            f"{path}: neither model.safetensors nor model.safetensors.index.json found "
            "(only safetensors checkpoints are read)"
        )
    with safe_open(single, framework="flax") as f:
        return dict.fromkeys(f.keys(), single)


def _set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def load_hf_llama(
    path: str,
    dtype: str = "float32",
    *,
    compute_dtype: str | None = None,
    attention_impl: str = "xla",
) -> Transformer:
    """Loads a Hugging Face Llama/Mistral checkpoint directory as a jaxlab :class:`Transformer`.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
      dtype: parameter storage dtype (``float32``, ``bfloat16``, ``float16``).
      compute_dtype: activation dtype; default ``dtype``.
      attention_impl: name of the attention implementation to use.

    Raises:
      CheckpointError: for an unsupported config field, a missing or unexpected tensor, or a
        tensor whose shape does not fit (the message names the key and both shapes).
    """
    config, pure = read_hf_llama(path, dtype, compute_dtype=compute_dtype,
                                 attention_impl=attention_impl)  # fmt: skip
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, state)


def read_hf_llama(
    path: str,
    dtype: str = "float32",
    *,
    compute_dtype: str | None = None,
    attention_impl: str = "xla",
) -> tuple[TransformerConfig, dict]:
    """The config and the parameters (a pure dict of host NumPy arrays, in ``dtype``) of a
    Hugging Face Llama/Mistral directory, read one tensor at a time, so a caller can place each
    on its sharding without the whole model ever sitting on one device. Arguments and errors as
    :func:`load_hf_llama`."""
    if dtype not in DTYPES:
        raise ValueError(f"load_hf_llama: dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{path}: no config.json")
    with open(config_path) as f:
        hf_config = json.load(f)
    config = config_from_hf(
        hf_config,
        param_dtype=dtype,
        dtype=compute_dtype or dtype,
        attention_impl=attention_impl,
    )
    files = _weight_files(path)
    table = _weight_table(config)
    expected = {e.hf_key for e in table}
    missing = sorted(expected - set(files))
    if missing:
        raise CheckpointError(
            f"{path}: missing tensors {missing[:10]}{' ...' * (len(missing) > 10)}"
        )
    unexpected = sorted(
        k for k in set(files) - expected if not k.endswith(_IGNORED_WEIGHT_SUFFIXES)
    )
    if unexpected:
        raise CheckpointError(
            f"{path}: tensors the config does not account for {unexpected[:10]}"
            f"{' ...' * (len(unexpected) > 10)}"
        )

    pure = nnx.to_pure_dict(
        nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    )
    by_file: dict[str, list[_Entry]] = {}
    for entry in table:
        by_file.setdefault(files[entry.hf_key], []).append(entry)
    for file, entries in by_file.items():
        with safe_open(file, framework="flax") as f:
            for entry in entries:
                tensor = f.get_tensor(entry.hf_key)
                if tuple(tensor.shape) != entry.hf_shape:
                    raise CheckpointError(
                        f"{entry.hf_key}: checkpoint shape {tuple(tensor.shape)} does not match "
                        f"the config's expected shape {entry.hf_shape}"
                    )
                value = entry.to_jax(tensor).astype(config.storage_dtype)
                _set_path(pure, entry.path, np.asarray(value))  # off the device at once
    return config, pure


def save_hf_llama(
    model: Transformer,
    path: str,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Writes ``model`` as a Hugging Face checkpoint directory that ``transformers`` loads.

    Args:
      model: a jaxlab :class:`Transformer`.
      path: output directory (created if needed).
      dtype: dtype of the written tensors; default the model's parameter dtype.
      max_shard_bytes: above this total size, tensors are split over several files with a
        ``model.safetensors.index.json``.
    """
    config: TransformerConfig = model.config
    if config.dwa is not None:
        raise CheckpointError(
            "save_hf_llama: a DenseFormer (config.dwa set) has depth-weighted averages that no "
            "Hugging Face Llama/Mistral architecture can hold"
        )
    dtype = dtype or config.param_dtype
    if dtype not in DTYPES:
        raise ValueError(f"save_hf_llama: dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    hf_config = config_to_hf(config, dtype)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = {}
    for entry in _weight_table(config):
        value = pure
        for key in entry.path:
            value = value[key]
        tensors[entry.hf_key] = jnp.asarray(entry.to_hf(value), DTYPES[dtype])

    os.makedirs(path, exist_ok=True)
    shards: list[dict[str, jax.Array]] = [{}]
    size = 0
    for key, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        total = int(sum(np.prod(v.shape) * v.dtype.itemsize for v in tensors.values()))
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)

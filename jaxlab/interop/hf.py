"""Hugging Face Llama-family checkpoints (``config.json`` + safetensors) <-> jaxlab models.

Supported ``model_type``: ``llama`` and ``mistral`` (sliding-window attention). Weights are read
from ``model.safetensors`` or, when there is none, from the shards listed in
``model.safetensors.index.json`` (the precedence ``transformers`` uses); only safetensors are
read, never pickles. Index entries must name files inside the checkpoint directory (relative
paths without ``..``; symlinks such as those of the Hugging Face cache are followed). Tensors
must be floating point (F64/F32/F16/BF16) and finite; ``config.json`` fields are checked for type
and range, and every error names the file and the field or tensor.

``save_hf_llama`` into a directory that already holds a checkpoint replaces it so that, at every
instant, a loader finds the complete old checkpoint, no loadable checkpoint, or the complete new
one, never new weights mixed with old ones or a config that does not match the weights: the old
entry points (index, then ``model.safetensors``) are removed first, then ``config.json`` and the
weight files are written (each through a temporary file and a rename), the index last, and
finally the old checkpoint's leftover shards are removed (only the files its index listed inside
the directory and ``model-NNNNN-of-NNNNN.safetensors`` shards). A save interrupted part way can
therefore leave no loadable checkpoint (save again), but never a wrong one. Other files
(tokenizer, README, ...) are left alone.

Rotary layout: Hugging Face stores q/k projections permuted for the half-split rotation
(dimension ``i`` pairs with ``i + head_dim/2``); jaxlab rotates in that same layout, so the
projections map over with a transpose and reshape only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from jaxlab.models.layers import RopeScaling
from jaxlab.models.transformer import DTYPES, Transformer, TransformerConfig, canonical_dtype

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# Config keys read here, and keys that carry no architectural meaning for inference.
_IGNORED_CONFIG_KEYS = {
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "initializer_range",
    "pad_token_id",
    "attention_dropout",
    "pretraining_tp",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "_name_or_path",
    "tokenizer_class",
    "_attn_implementation_autoset",
}
_CONFIG_KEYS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "bos_token_id",
    "eos_token_id",
    "max_window_layers",
    "use_sliding_window",
}
# Non-parameter buffers some exporters wrote into checkpoints.
_IGNORED_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)
# safetensors dtype codes we read: floating point only (an integer or bool tensor in a float
# parameter's place is a broken or quantised checkpoint, never something to cast silently).
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that does not fit a jaxlab model."""


# --------------------------------------------------------------------------------------------
# Config


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _int_field(
    hf: dict,
    key: str,
    source: str,
    *,
    default: Any = ...,
    minimum: int = 1,
    allow_none: bool = False,
) -> Any:
    """``hf[key]`` checked to be an int >= ``minimum`` (bools are not ints here)."""
    if key not in hf and default is not ...:
        return default
    if key not in hf:
        raise CheckpointError(f"{source}: required field {key!r} is missing")
    value = hf[key]
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise CheckpointError(
            f"{source}: {key} must be an int >= {minimum}{' or null' * allow_none}, found "
            f"{_type_name(value)} {value!r}"
        )
    return value


def _positive_float(value: Any, field: str, source: str) -> float:
    """``value`` checked to be a finite number > 0 (JSON ints included, bools and strings not)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise CheckpointError(
            f"{source}: {field} must be a finite number > 0, found {_type_name(value)} {value!r}"
        )
    return float(value)


def _bool_field(hf: dict, key: str, source: str) -> bool:
    value = hf.get(key, False)
    if not isinstance(value, bool):
        raise CheckpointError(
            f"{source}: {key} must be true or false, found {_type_name(value)} {value!r}"
        )
    return value


def _token_ids(hf: dict, key: str, source: str, *, many: bool) -> Any:
    value = hf.get(key)
    ids = value if many and isinstance(value, list) else [value]
    if value is not None and not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
    ):
        raise CheckpointError(
            f"{source}: {key} must be a non-negative int{', a list of them' * many} or null, "
            f"found {_type_name(value)} {value!r}"
        )
    return tuple(value) if isinstance(value, list) else value


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """Translates a Hugging Face ``config.json`` mapping into a :class:`TransformerConfig`.

    Raises:
      CheckpointError: naming the field, for anything jaxlab cannot represent exactly or a field
        of the wrong type or range (e.g. ``rope_theta`` that is not a number > 0).
    """
    return _config_from_hf(hf, "config.json", overrides)


def _config_from_hf(hf: Any, source: str, overrides: dict[str, Any]) -> TransformerConfig:
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: expected a JSON object, found {_type_name(hf)}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type={model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
        )
    unknown = sorted(set(hf) - _CONFIG_KEYS - _IGNORED_CONFIG_KEYS)
    if unknown:
        raise CheckpointError(f"{source}: unsupported fields {unknown}")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r} (only 'silu')")

    # Transformers < 5 wrote rope_theta + rope_scaling; 5.x writes rope_parameters.
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise CheckpointError(
                f"{source}: {key} must be an object or null, found "
                f"{_type_name(hf[key])} {hf[key]!r}"
            )
    rope_key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = dict(hf.get(rope_key) or {})
    if "rope_theta" in rope:
        rope_theta = _positive_float(rope.pop("rope_theta"), f"{rope_key}.rope_theta", source)
    else:
        rope_theta = _positive_float(hf.get("rope_theta", 10000.0), "rope_theta", source)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{source}: {rope_key}.partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        scaling = None
    elif rope_type in ("linear", "llama3"):
        allowed = {f.name for f in dataclasses.fields(RopeScaling)} - {"type"}
        extra = sorted(set(rope) - allowed)
        if extra:
            raise CheckpointError(f"{source}: unsupported {rope_key} fields {extra}")
        try:
            scaling = RopeScaling(type=rope_type, **rope)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: {rope_key} {rope}: {e}") from e
    else:
        raise CheckpointError(
            f"{source}: {rope_key} rope type {rope_type!r} is not supported "
            "(default, linear, llama3)"
        )

    use_sliding_window = hf.get("use_sliding_window")
    if use_sliding_window is not None and not isinstance(use_sliding_window, bool):
        raise CheckpointError(
            f"{source}: use_sliding_window must be true, false or null, found "
            f"{_type_name(use_sliding_window)} {use_sliding_window!r}"
        )
    sliding_window = (
        _int_field(hf, "sliding_window", source, default=None, allow_none=True)
        if model_type == "mistral" and use_sliding_window is not False
        else None
    )
    num_heads = _int_field(hf, "num_attention_heads", source)
    hidden_size = _int_field(hf, "hidden_size", source)
    rms_norm_eps = _positive_float(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps", source)
    values = dict(
        vocab_size=_int_field(hf, "vocab_size", source),
        hidden_size=hidden_size,
        intermediate_size=_int_field(hf, "intermediate_size", source),
        num_layers=_int_field(hf, "num_hidden_layers", source),
        num_heads=num_heads,
        num_kv_heads=_int_field(hf, "num_key_value_heads", source, default=None, allow_none=True)
        or num_heads,
        head_dim=_int_field(hf, "head_dim", source, default=None, allow_none=True)
        or hidden_size // num_heads,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        rope_scaling=scaling,
        tie_embeddings=_bool_field(hf, "tie_word_embeddings", source),
        attention_bias=_bool_field(hf, "attention_bias", source),
        mlp_bias=_bool_field(hf, "mlp_bias", source),
        sliding_window=sliding_window,
        max_seq_len=_int_field(hf, "max_position_embeddings", source, default=2048),
        bos_token_id=_token_ids(hf, "bos_token_id", source, many=False),
        eos_token_id=_token_ids(hf, "eos_token_id", source, many=True),
    )
    values.update(overrides)
    try:
        return TransformerConfig(**values)
    except ValueError as e:  # e.g. heads that do not divide: name the file as well
        raise CheckpointError(f"{source}: {e}") from e


def read_hf_config(path: str) -> dict[str, Any]:
    """The ``config.json`` mapping of the checkpoint directory ``path``.

    Raises:
      CheckpointError: naming the file, when it is missing, not UTF-8 JSON or not an object.
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{path}: no config.json")
    hf = _read_json(config_path, "a JSON object (the model's config)")
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, found {_type_name(hf)}")
    return hf


def _read_json(file: str, expected: str) -> Any:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{file}: expected {expected}, found invalid JSON at line {e.lineno} column "
            f"{e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{file}: expected {expected} in UTF-8, found invalid UTF-8 at byte {e.start}"
        ) from None


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
    to_jax: Callable[[np.ndarray], np.ndarray]  # HF layout -> ours (host NumPy, when reading)
    to_hf: Callable[[jax.Array], jax.Array]  # ours -> HF layout (jax arrays, when saving)


def _weight_table(c: TransformerConfig) -> list[_Entry]:
    E, H, K, D, M, V = (
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size,
    )

    def identity(x):
        return x

    def transpose(w):  # NumPy when reading (no compiled op), jax arrays when saving
        return w.T

    table = [
        _Entry("model.embed_tokens.weight", ("embed",), (V, E), identity, identity),
        _Entry("model.norm.weight", ("final_norm", "scale"), (E,), identity, identity),
    ]
    if not c.tie_embeddings:
        table.append(_Entry("lm_head.weight", ("lm_head",), (V, E), transpose, transpose))

    def in_proj(heads):  # [heads*D, E] <-> [E, heads, D]
        return (lambda w: w.T.reshape(E, heads, D), lambda w: w.reshape(E, heads * D).T)

    def head_bias(heads):  # [heads*D] <-> [heads, D]
        return (lambda b: b.reshape(heads, D), lambda b: b.reshape(heads * D))

    out_proj = (lambda w: w.T.reshape(H, D, E), lambda w: w.reshape(H * D, E).T)
    for i in range(c.num_layers):
        p, layer = f"model.layers.{i}.", ("layers", i)
        table += [
            _Entry(
                p + "input_layernorm.weight",
                (*layer, "input_norm", "scale"),
                (E,),
                identity,
                identity,
            ),
            _Entry(
                p + "post_attention_layernorm.weight",
                (*layer, "post_attention_norm", "scale"),
                (E,),
                identity,
                identity,
            ),
            _Entry(
                p + "self_attn.q_proj.weight", (*layer, "attn", "q_proj"), (H * D, E), *in_proj(H)
            ),
            _Entry(
                p + "self_attn.k_proj.weight", (*layer, "attn", "k_proj"), (K * D, E), *in_proj(K)
            ),
            _Entry(
                p + "self_attn.v_proj.weight", (*layer, "attn", "v_proj"), (K * D, E), *in_proj(K)
            ),
            _Entry(
                p + "self_attn.o_proj.weight", (*layer, "attn", "o_proj"), (E, H * D), *out_proj
            ),
            _Entry(
                p + "mlp.gate_proj.weight",
                (*layer, "mlp", "gate_proj"),
                (M, E),
                transpose,
                transpose,
            ),
            _Entry(
                p + "mlp.up_proj.weight",
                (*layer, "mlp", "up_proj"),
                (M, E),
                transpose,
                transpose,
            ),
            _Entry(
                p + "mlp.down_proj.weight",
                (*layer, "mlp", "down_proj"),
                (E, M),
                transpose,
                transpose,
            ),
        ]
        if c.attention_bias:
            for name, heads in (("q", H), ("k", K), ("v", K)):
                table.append(
                    _Entry(
                        p + f"self_attn.{name}_proj.bias",
                        (*layer, "attn", f"{name}_bias"),
                        (heads * D,),
                        *head_bias(heads),
                    )
                )
            table.append(
                _Entry(
                    p + "self_attn.o_proj.bias",
                    (*layer, "attn", "o_bias"),
                    (E,),
                    identity,
                    identity,
                )
            )
        if c.mlp_bias:
            for name, size in (("gate", M), ("up", M), ("down", E)):
                table.append(
                    _Entry(
                        p + f"mlp.{name}_proj.bias",
                        (*layer, "mlp", f"{name}_bias"),
                        (size,),
                        identity,
                        identity,
                    )
                )
    return table


def _confined(name: Any, index: str, key: str) -> str:
    """``name``, an index ``weight_map`` value, checked to be a relative path inside the
    checkpoint directory (no absolute path, no ``..``); symlinks inside are allowed (the Hugging
    Face cache links snapshot files to its blob store)."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(
            f"{index}: weight_map[{key!r}] must be a file name, found {_type_name(name)} {name!r}"
        )
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or os.path.splitdrive(name)[0] or name.startswith("/") or ".." in parts:
        raise CheckpointError(
            f"{index}: weight_map[{key!r}] = {name!r} points outside the checkpoint directory "
            "(expected a file name relative to it, without '..')"
        )
    if not name.endswith(".safetensors"):
        raise CheckpointError(
            f"{index}: weight_map[{key!r}] = {name!r} is not a .safetensors "
            "file (only safetensors are read)"
        )
    return name


def _read_index(index: str) -> dict[str, str]:
    """The ``weight_map`` of ``index`` (tensor name -> file name relative to its directory)."""
    contents = _read_json(index, 'a JSON object with a "weight_map"')
    if not isinstance(contents, dict) or "weight_map" not in contents:
        found = "no weight_map" if isinstance(contents, dict) else _type_name(contents)
        raise CheckpointError(
            f'{index}: expected a JSON object with a "weight_map" (tensor -> file), found {found}'
        )
    weight_map = contents["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index}: weight_map must be an object (tensor -> file), found "
            f"{_type_name(weight_map)}"
        )
    return {k: _confined(v, index, k) for k, v in weight_map.items()}


def _weight_files(path: str) -> dict[str, str]:
    """Maps each tensor name to the safetensors file that holds it.

    ``model.safetensors`` wins over an index when both are there, as in ``transformers``.
    """
    single = os.path.join(path, SINGLE_FILE)
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(single):
        with safe_open(single, framework="numpy") as f:
            return dict.fromkeys(f.keys(), single)
    if os.path.exists(index):
        return {k: os.path.join(path, v) for k, v in _read_index(index).items()}
    raise CheckpointError(
        f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found (only safetensors checkpoints "
        "are read)"
    )


def _set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def load_hf_llama(
    path: str,
    dtype: Any = "float32",
    *,
    compute_dtype: Any = None,
    attention_impl: str = "xla",
) -> Transformer:
    """Loads a Hugging Face Llama/Mistral checkpoint directory as a jaxlab :class:`Transformer`.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
      dtype: parameter storage dtype (``float32``, ``bfloat16``, ``float16``), as a name or
        anything ``jnp.dtype`` takes (``jnp.float32``, ``np.float32``, ``np.dtype(...)``).
      compute_dtype: activation dtype, taken the same ways; default ``dtype``.
      attention_impl: name of the attention implementation to use.

    Raises:
      ValueError: ``dtype`` or ``compute_dtype`` outside the supported dtypes.
      CheckpointError: naming the file and field or tensor, for a ``config.json`` or index that
        is not a JSON object, a config field of the wrong type or range or that jaxlab cannot
        represent, an index entry outside the directory, a missing or unexpected tensor, a
        tensor whose shape does not fit (the message names the key and both shapes), a
        non-floating-point tensor, or non-finite values.
    """
    config, pure = read_hf_llama(
        path, dtype, compute_dtype=compute_dtype, attention_impl=attention_impl
    )
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    # device_put, not jnp.asarray: in jax 0.10 the latter compiles a program per shape
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.device_put, pure))
    return nnx.merge(graphdef, state)


def read_hf_llama(
    path: str,
    dtype: Any = "float32",
    *,
    compute_dtype: Any = None,
    attention_impl: str = "xla",
) -> tuple[TransformerConfig, dict]:
    """The config and the parameters (a pure dict of host NumPy arrays, in ``dtype``) of a
    Hugging Face Llama/Mistral directory, read one tensor at a time, so a caller can place each
    on its sharding without the whole model ever sitting on one device. Arguments and errors as
    :func:`load_hf_llama`.

    Everything here runs in NumPy on the host: no jax operation, so nothing is compiled. (Each
    eager jax operation on a new shape compiles a small XLA program that stays in memory: the
    ~30 such programs of reading lm_tiny's 40 tensors with jax held ~48 MiB of RSS.)"""
    dtype = canonical_dtype(dtype, "load_hf_llama/read_hf_llama: dtype")
    if compute_dtype is not None:
        compute_dtype = canonical_dtype(compute_dtype, "load_hf_llama/read_hf_llama: compute_dtype")
    hf_config = read_hf_config(path)
    config = _config_from_hf(
        hf_config,
        os.path.join(path, "config.json"),
        dict(param_dtype=dtype, dtype=compute_dtype or dtype, attention_impl=attention_impl),
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
        with safe_open(file, framework="numpy") as f:  # bfloat16: ml_dtypes, imported by jax
            for entry in entries:
                code = f.get_slice(entry.hf_key).get_dtype()
                if code not in _FLOAT_CODES:
                    raise CheckpointError(
                        f"{file}: tensor {entry.hf_key} has dtype {code}; expected a floating "
                        f"point dtype ({', '.join(_FLOAT_CODES)}); integer, bool and 8-bit "
                        "tensors are not cast"
                    )
                tensor = f.get_tensor(entry.hf_key)
                if tuple(tensor.shape) != entry.hf_shape:
                    raise CheckpointError(
                        f"{entry.hf_key}: checkpoint shape {tuple(tensor.shape)} does not match "
                        f"the config's expected shape {entry.hf_shape}"
                    )
                if not np.isfinite(tensor).all():
                    bad = int(np.sum(~np.isfinite(tensor)))
                    raise CheckpointError(
                        f"{file}: tensor {entry.hf_key} has {bad} non-finite values (NaN or "
                        "Inf); expected finite weights"
                    )
                with np.errstate(over="ignore"):  # an overflow is reported just below
                    # one copy: the layout change, the cast and C order at once
                    value = np.ascontiguousarray(entry.to_jax(tensor), config.storage_dtype)
                if not np.isfinite(value).all():
                    raise CheckpointError(
                        f"{file}: tensor {entry.hf_key} ({code}) overflows {config.param_dtype} "
                        f"(largest magnitude {float(np.max(np.abs(tensor)))}); load it in a "
                        "wider dtype"
                    )
                _set_path(pure, entry.path, value)
    return config, pure


def check_hf_exportable(config: Any) -> None:
    """Raises a :class:`CheckpointError` when :func:`save_hf_llama` cannot write a model of
    ``config`` (a model config dataclass): not a Transformer, a DenseFormer, stacked
    (``scan_layers``) or side-by-side layers. A run that exports at its end checks this before
    it trains."""
    if not isinstance(config, TransformerConfig):
        raise CheckpointError(
            f"save_hf_llama: a {type(config).__name__} model has no Hugging Face Llama/Mistral "
            "form; only Transformer (llama) models export"
        )
    if config.dwa is not None:
        raise CheckpointError(
            "save_hf_llama: a DenseFormer (config.dwa set) has depth-weighted averages that no "
            "Hugging Face Llama/Mistral architecture can hold"
        )
    if config.scan_layers:
        raise CheckpointError(
            "save_hf_llama: the model has scan_layers=True (its blocks' parameters are stacked); "
            "Hugging Face checkpoints hold one set per layer, so save an unrolled model"
        )
    if config.sparse_attention is not None:
        raise CheckpointError(
            "save_hf_llama: the model uses sparse attention (config.sparse_attention="
            f"{config.sparse_attention}); a Hugging Face Llama/Mistral would attend densely and "
            "give other logits, so save it as a jaxlab checkpoint"
        )
    for field in ("layer_widths", "parallel_groups"):
        if getattr(config, field) is not None:
            raise CheckpointError(
                f"save_hf_llama: the model evaluates layers side by side ({field}="
                f"{getattr(config, field)}), which no Hugging Face Llama/Mistral architecture "
                "can express; save it as a jaxlab checkpoint"
            )


def save_hf_llama(
    model: Transformer,
    path: str,
    *,
    dtype: Any = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Writes ``model`` as a Hugging Face checkpoint directory that ``transformers`` loads.

    A directory that already holds a checkpoint gets the new one in its place, in an order that
    keeps every intermediate state either the complete old checkpoint, no loadable checkpoint,
    or the complete new one (for :func:`load_hf_llama` and ``transformers`` alike):

    1. the old entry points are removed: ``model.safetensors.index.json``, then
       ``model.safetensors`` (from here on nothing loads);
    2. ``config.json`` is written;
    3. the weight files are written, each through a temporary file and a rename (new shards are
       unreachable while there is no index; for a single-file save, the rename of
       ``model.safetensors`` is the moment the new checkpoint appears);
    4. a sharded save writes its index last (the moment the new checkpoint appears);
    5. the old checkpoint's shards that were not rewritten are removed: only files its index
       listed inside the directory and ``model-NNNNN-of-NNNNN.safetensors`` shards.

    A save interrupted part way (Ctrl-C, a killed process) can thus leave the directory without
    a loadable checkpoint (save again), but never with new and old weights mixed or a config
    that does not match the weights. Exported files get the usual ``0o666 & ~umask`` mode. No
    other file is touched.

    Args:
      model: a jaxlab :class:`Transformer`.
      path: output directory (created if needed).
      dtype: dtype of the written tensors (a name or anything ``jnp.dtype`` takes, e.g.
        ``jnp.bfloat16``); default the model's parameter dtype.
      max_shard_bytes: above this total size, tensors are split over several files with a
        ``model.safetensors.index.json``.
    """
    config: TransformerConfig = model.config
    check_hf_exportable(config)
    dtype = canonical_dtype(config.param_dtype if dtype is None else dtype, "save_hf_llama: dtype")
    hf_config = config_to_hf(config, dtype)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = {}
    for entry in _weight_table(config):
        value = pure
        for key in entry.path:
            value = value[key]
        tensors[entry.hf_key] = jnp.asarray(entry.to_hf(value), DTYPES[dtype])

    os.makedirs(path, exist_ok=True)
    stale = _own_weight_files(path)
    shards: list[dict[str, jax.Array]] = [{}]
    size = 0
    for key, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    metadata = {"format": "pt"}
    # 1. Entry points of the old checkpoint first (index before model.safetensors, as the
    # latter would otherwise still win over it): from here on nothing loads until the commit.
    for name in (INDEX_FILE, SINGLE_FILE):
        if name in stale:
            _remove(path, name)
    # 2. The config, with no weights beside it yet.
    _atomic_write(path, "config.json", lambda f: _dump_json(hf_config, f))
    # 3-4. The weights; the rename of model.safetensors or of the index (written last, after
    # every shard it lists) is the commit point.
    if len(shards) == 1:
        _atomic_write(path, SINGLE_FILE, lambda f: save_file(shards[0], f, metadata=metadata))
        written = {SINGLE_FILE}
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_write(path, name, lambda f, shard=shard: save_file(shard, f, metadata=metadata))
            weight_map.update(dict.fromkeys(shard, name))
        total = int(sum(np.prod(v.shape) * v.dtype.itemsize for v in tensors.values()))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic_write(path, INDEX_FILE, lambda f: _dump_json(index, f))
        written = {INDEX_FILE, *weight_map.values()}
    # 5. Leftover shards of the old checkpoint, unreachable since step 1.
    for name in sorted(stale - written - {INDEX_FILE, SINGLE_FILE}):
        _remove(path, name)


def _remove(directory: str, name: str) -> None:
    try:
        os.remove(os.path.join(directory, name))
    except FileNotFoundError:
        pass


def _own_weight_files(path: str) -> set[str]:
    """The weight files of a checkpoint already in ``path`` (names relative to it) that a new
    save replaces: ``model.safetensors``, the index and the files it lists (when they stay
    inside ``path`` and are safetensors), and ``model-NNNNN-of-NNNNN.safetensors`` shards."""
    names = {n for n in os.listdir(path) if n == SINGLE_FILE or _SHARD_NAME.fullmatch(n)}
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        names.add(INDEX_FILE)
        try:
            contents = _read_json(index, "an index")
            listed = contents.get("weight_map", {}) if isinstance(contents, dict) else {}
            for key, name in listed.items() if isinstance(listed, dict) else ():
                try:
                    names.add(os.path.normpath(_confined(name, index, key)))
                except CheckpointError:  # never ours to delete
                    pass
        except CheckpointError:  # an unreadable index: replaced, its files unknown
            pass
    return {n for n in names if os.path.isfile(os.path.join(path, n))}


def _dump_json(value: Any, file: str) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)


def _atomic_write(directory: str, name: str, write: Callable[[str], None]) -> None:
    """``write(temporary_file)`` then rename it to ``directory/name``: readers see the old file
    or the complete new one, never a partial one. The file gets the mode a plain ``open`` would
    give it (``0o666 & ~umask``), not ``mkstemp``'s owner-only 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask

"""Parameters from existing models: a Hugging Face checkpoint or another run's checkpoint.

A *source* is a string:

* ``hf:PATH``: a Hugging Face Llama/Mistral directory (``config.json`` + safetensors), read by
  :func:`jaxlab.interop.hf.load_hf_llama`;
* ``run:WORKDIR`` or ``run:WORKDIR@STEP``: the parameters of a jaxlab run's newest (or ``STEP``)
  checkpoint; its model config is ``WORKDIR/model_config.json``.

Used for ``config.init_from`` (the trained model's starting point) and for the frozen models an
objective asks for (a teacher, a reference). Parameters are read straight onto their shardings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxlab import models
from jaxlab.models.resize import resize_rows
from jaxlab.optim import param_path
from jaxlab.train.checkpoint import Checkpointer

MODEL_CONFIG_FILE = "model_config.json"
# Fields that change how a checkpoint is stored or computed, not what it computes.
_NON_ARCHITECTURE = {
    "vocab_size",  # a larger model vocabulary grows the source's (added special tokens)
    "param_dtype",
    "dtype",
    "attention_impl",
    "remat",
    "max_seq_len",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "scan_impl",
    "chunk_size",
}


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # "hf" or "run"
    path: str
    step: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" + ("" if self.step is None else f"@{self.step}")


def parse_source(spec: str, field: str = "config.init_from") -> Source:
    """``hf:PATH`` | ``run:WORKDIR`` | ``run:WORKDIR@STEP`` (errors name ``field``)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("hf", "run") or not rest:
        raise ValueError(
            f"{field} must be 'hf:PATH', 'run:WORKDIR' or 'run:WORKDIR@STEP', got {spec!r}"
        )
    step = None
    if kind == "run" and "@" in rest:
        rest, _, step_text = rest.rpartition("@")
        if not step_text.isdigit():
            raise ValueError(f"{field}: the step after '@' must be an integer, got {spec!r}")
        step = int(step_text)
    if not os.path.isdir(rest):
        raise ValueError(f"{field}: {rest!r} is not a directory (from {spec!r})")
    return Source(kind, rest, step)


def write_model_config(workdir: str, model_config) -> None:
    """``WORKDIR/model_config.json``: what ``run:WORKDIR`` sources build their model from."""
    with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
        json.dump(model_config.to_dict(), f, indent=2)


def save_model_source(workdir: str, model: nnx.Module, *, step: int = 0) -> str:
    """Writes ``model`` where a ``run:WORKDIR`` source reads it: ``WORKDIR/model_config.json``
    and checkpoint ``step`` in ``WORKDIR/checkpoints`` holding its parameters, so a run can start
    from a model built outside training (``config.init_from``, e.g. a
    :func:`jaxlab.models.depth.layer_parallel` model) or read it as a frozen model.

    Args:
      workdir: the directory (made if missing); it must hold no checkpoint yet (nothing of a
        run is overwritten or pruned).
      model: a model of a registered family (it has a ``config`` :func:`jaxlab.models.build`
        accepts).
      step: the checkpoint's step number, >= 0.

    Returns:
      The source, ``"run:WORKDIR@STEP"``.
    """
    model_config = getattr(model, "config", None)
    if model_config is None or not dataclasses.is_dataclass(model_config):
        raise TypeError(
            f"save_model_source: model must be a jaxlab model with a config dataclass, got "
            f"{type(model).__name__}"
        )
    models.make_config(model_config)  # an unregistered family is an error naming config.name
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"save_model_source: step must be an int >= 0, got {step!r}")
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
    try:
        if checkpointer.all_steps():
            raise ValueError(
                f"save_model_source: workdir {workdir!r} already holds checkpoints "
                f"{sorted(checkpointer.all_steps())}; use a new directory"
            )
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        # The layout of a training checkpoint's state, of which load_params reads "params".
        checkpointer.save(step, {"params": params}, {}, {"model": model_config.to_dict()})
    finally:
        checkpointer.close()
    write_model_config(workdir, model_config)
    return f"run:{workdir}@{step}"


def source_model_config(source: Source, **overrides) -> Any:
    """The model config dataclass of ``source`` (``overrides``: dtypes and the like)."""
    if source.kind == "hf":
        from jaxlab.interop.hf import CheckpointError, config_from_hf, read_hf_config

        try:
            return config_from_hf(read_hf_config(source.path), **overrides)
        except CheckpointError as e:
            raise ValueError(f"{source}: {e}") from None
    path = os.path.join(source.path, MODEL_CONFIG_FILE)
    if os.path.exists(path):
        with open(path) as f:
            values = json.load(f)
    else:  # a run that predates model_config.json: its config, with the tokenizer's vocabulary
        run_config = os.path.join(source.path, "config.json")
        if not os.path.exists(run_config):
            raise ValueError(f"{source}: neither {MODEL_CONFIG_FILE} nor config.json is there")
        with open(run_config) as f:
            stored = json.load(f)
        values = dict(stored["model"])
        if not values.get("vocab_size"):
            from jaxlab.data.tokenizers import load_tokenizer

            tokenizer = stored.get("data", {}).get("tokenizer") or None
            values["vocab_size"] = load_tokenizer(tokenizer).vocab_size
    values.update(overrides)
    return models.make_config(values)


def architecture_differences(a, b) -> list[str]:
    """Fields (other than dtypes and implementation choices) in which two model configs differ."""
    if type(a) is not type(b):
        return [f"family {a.name!r} vs {b.name!r}"]
    return [
        f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
        for f in dataclasses.fields(a)
        if f.name not in _NON_ARCHITECTURE and getattr(a, f.name) != getattr(b, f.name)
    ]


def _by_name(tree) -> dict[str, Any]:
    return {param_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _hf_params(source: Source, param_dtype: str) -> dict[str, np.ndarray]:
    from jaxlab.interop.hf import CheckpointError, read_hf_llama

    try:
        _, params = read_hf_llama(source.path, dtype=param_dtype)
    except CheckpointError as e:
        raise ValueError(f"{source}: {e}") from None
    return _by_name(params)


def _place(value, sharding) -> jax.Array:
    """A host array on ``sharding``, each process transferring only its addressable shards."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _run_checkpoint(source: Source) -> tuple[Checkpointer, int]:
    directory = os.path.join(source.path, "checkpoints")
    if not os.path.isdir(directory):
        raise ValueError(f"{source}: no checkpoints directory in {source.path!r}")
    checkpointer = Checkpointer(directory, create=False)
    steps = checkpointer.all_steps()
    step = source.step if source.step is not None else checkpointer.latest_step()
    if step is None or step not in steps:
        checkpointer.close()
        raise ValueError(
            f"{source}: no checkpoint {'' if step is None else step} there (steps {sorted(steps)})"
        )
    return checkpointer, step


def pinned(source: Source) -> Source:
    """``run:WORKDIR`` resolved to its newest checkpoint now (``run:WORKDIR@STEP``), so a run
    that resumes later reads the same parameters even if the source run trained on."""
    if source.kind != "run" or source.step is not None:
        return source
    checkpointer, step = _run_checkpoint(source)
    checkpointer.close()
    return dataclasses.replace(source, step=step)


# The vocabulary axis of the parameters that grow with it (the Transformer's and MambaLM's).
_VOCAB_AXIS = {"embed": 0, "lm_head": 1}


def _grows(shape, target_shape, axis: int) -> bool:
    shape, target_shape = tuple(shape), tuple(target_shape)
    if len(shape) != len(target_shape):
        return False
    others = shape[:axis] + shape[axis + 1 :] == target_shape[:axis] + target_shape[axis + 1 :]
    return others and shape[axis] < target_shape[axis]


def _replicated(sharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())


def _renamer(mapping, field: str):
    """``name -> name`` applying ``(source prefix, target prefix)`` pairs (whole path
    components; a trailing ``/`` is ignored)."""
    pairs = []
    for entry in mapping:
        if (
            not isinstance(entry, (tuple, list))
            or len(entry) != 2
            or not all(isinstance(x, str) and x.strip("/") for x in entry)
        ):
            raise ValueError(
                f"{field}_map entries must be (source prefix, model prefix) pairs "
                f"of non-empty strings, got {entry!r}"
            )
        pairs.append((entry[0].strip("/"), entry[1].strip("/")))

    def rename(name: str) -> str:
        for old, new in pairs:
            if name == old or name.startswith(old + "/"):
                return new + name[len(old) :]
        return name

    return pairs, rename


def _available(names_and_info, mapping, field: str, source) -> dict[str, tuple]:
    """``{model path: (source path, shape, dtype)}`` after the renames; two source paths that
    land on one model path, or a rename that matches nothing, are errors."""
    pairs, rename = _renamer(mapping, field)
    available: dict[str, tuple] = {}
    for name, shape, dtype in names_and_info:
        target = rename(name)
        if target in available:
            raise ValueError(
                f"{field}_map: source parameters {available[target][0]} and {name} "
                f"both map to {target} ({source})"
            )
        available[target] = (name, tuple(shape), dtype)
    sources = [n for n, _, _ in names_and_info]
    for old, _ in pairs:
        if not any(n == old or n.startswith(old + "/") for n in sources):
            raise ValueError(f"{field}_map: no parameter of {source} starts with {old!r}")
    return available


def load_params(
    source: Source,
    abstract,
    *,
    partial: bool = False,
    mapping: Sequence[tuple[str, str]] = (),
    field: str = "config.init_from",
    fallback=None,
) -> tuple[Any, dict[str, list[str]]]:
    """Parameters of ``source`` placed like ``abstract`` (``ShapeDtypeStruct`` leaves with
    shardings).

    Args:
      source: where the parameters come from.
      abstract: the target parameters (paths, shapes, dtypes, shardings).
      partial: copy the parameters whose (renamed) path exists in both, keep ``fallback``'s for
        the rest; without it every target parameter must come from the source and every source
        parameter must be used.
      mapping: ``(source prefix, target prefix)`` pairs applied to source paths first.
      field: the config field named in errors.
      fallback: parameters (like ``abstract``) for the paths the source lacks (``partial``).

    A larger vocabulary than the source's (tokens added to the tokenizer) grows ``embed`` and
    ``lm_head``: the source's rows are copied and the new ones are the mean of the old
    (:func:`jaxlab.models.resize.resize_rows`), so old tokens' logits do not change.

    Returns:
      ``(params, report)``; ``report`` lists ``copied``, ``kept`` (target paths not in the
      source) and ``unused`` (source paths not in the target), by name, and ``grown``
      (``{name: [source vocab, model vocab]}``).

    Raises:
      ValueError: naming the parameter and both shapes (or dtypes) where they differ, or the
        missing / unused parameters without ``partial``.
    """
    targets = _by_name(abstract)
    if source.kind == "hf":
        dtypes = {str(leaf.dtype) for leaf in targets.values()}
        param_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
        host = _hf_params(source, param_dtype)
        info = [(n, v.shape, v.dtype) for n, v in host.items()]
        available = _available(info, mapping, field, source)
    else:
        checkpointer, step = _run_checkpoint(source)
        state_dir = os.path.join(checkpointer.path(step), "state")
        checkpointer.close()
        metadata = ocp.PyTreeCheckpointer().metadata(state_dir)
        metadata = getattr(metadata, "item_metadata", metadata)
        metadata = getattr(metadata, "tree", metadata)
        stored = _by_name(metadata["params"])
        info = [(n, m.shape, m.dtype) for n, m in stored.items()]
        available = _available(info, mapping, field, source)
    grown = {}
    for name, target in targets.items():
        if name in available:
            _, shape, dtype = available[name]
            axis = _VOCAB_AXIS.get(name)
            if axis is not None and _grows(shape, target.shape, axis):
                grown[name] = [int(shape[axis]), int(target.shape[axis])]
            elif tuple(shape) != tuple(target.shape):
                raise ValueError(
                    f"{field} {source}: parameter {name} has shape {tuple(shape)} "
                    f"there, the model's is {tuple(target.shape)}"
                )
            if np.dtype(dtype) != np.dtype(target.dtype):
                raise ValueError(
                    f"{field} {source}: parameter {name} has dtype "
                    f"{np.dtype(dtype)} there, the model's is "
                    f"{np.dtype(target.dtype)}"
                )
    copied = sorted(n for n in targets if n in available)
    kept = sorted(n for n in targets if n not in available)
    unused = sorted(available[n][0] for n in available if n not in targets)
    if not partial and (kept or unused):
        raise ValueError(
            f"{field} {source}: the model's parameters {kept[:10]} are not in the "
            f"source and the source's {unused[:10]} are not in the model (set "
            f"config.init_from_mode='partial' to copy only matching paths)"
        )
    if not copied:
        raise ValueError(f"{field} {source}: no parameter path matches the model's")
    if partial and kept and fallback is None:
        raise ValueError(f"{field} {source}: no fallback for the parameters {kept[:10]}")

    if source.kind == "hf":
        values = {n: host[available[n][0]] for n in copied}
    else:
        source_name = {n: available[n][0] for n in copied}
        read_as = {n: targets[n] for n in copied}
        for n in grown:  # read at the stored size, replicated, then grown below
            read_as[n] = jax.ShapeDtypeStruct(
                available[n][1], targets[n].dtype, sharding=_replicated(targets[n].sharding)
            )
        item = _unflatten_like(
            metadata["params"],
            {available[n][0]: read_as[n] for n in copied},
            keep=set(source_name.values()),
        )
        restored = ocp.PyTreeCheckpointer().restore(
            state_dir,
            args=ocp.args.PyTreeRestore(
                item={"params": item},
                restore_args=ocp.checkpoint_utils.construct_restore_args({"params": item}),
                partial_restore=True,
            ),
        )
        flat = _by_name(restored["params"])
        values = {n: flat[source_name[n]] for n in copied}
    for name, (_, size) in grown.items():
        axis = _VOCAB_AXIS[name]

        def grow(x, axis=axis, size=size):
            """x with its vocabulary axis resized to size rows."""
            return jnp.moveaxis(resize_rows(jnp.moveaxis(x, axis, 0), size), 0, axis)

        values[name] = jax.jit(grow, out_shardings=targets[name].sharding)(values[name])
    values = {
        n: v if isinstance(v, jax.Array) else _place(v, targets[n].sharding)
        for n, v in values.items()
    }
    fallback_leaves = _by_name(fallback) if fallback is not None else {}
    params = jax.tree_util.tree_map_with_path(
        lambda p, _: values.get(param_path(p), fallback_leaves.get(param_path(p))), abstract
    )
    return params, {"copied": copied, "kept": kept, "unused": unused, "grown": grown}


def _unflatten_like(metadata_tree, by_source_name: dict[str, Any], keep: set[str]):
    """The stored tree's nested dicts, keeping only the ``keep`` leaves, each replaced by its
    target ``ShapeDtypeStruct`` (a partial restore reads just those)."""

    def build(node, prefix):
        if isinstance(node, dict):
            out = {}
            for key, child in node.items():
                name = f"{prefix}/{key}" if prefix else str(key)
                sub = build(child, name)
                if sub is not None:
                    out[key] = sub
            return out or None
        return by_source_name[prefix] if prefix in keep else None

    return build(metadata_tree, "") or {}


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """A frozen model an objective reads: its source, config, graph definition and parameter
    shardings (nothing allocated until :func:`load_frozen`)."""

    source: Source
    model_config: Any
    graphdef: nnx.GraphDef
    abstract: Any  # ShapeDtypeStruct leaves with shardings


def frozen_model(spec: str, name: str, *, shardings_of, dtypes: dict[str, str]) -> FrozenModel:
    """The structure of frozen model ``name`` from source ``spec``; ``shardings_of(abstract
    nnx.State) -> shardings``. A Hugging Face source is read in ``dtypes`` (``param_dtype``,
    ``dtype``: the run's own); a run keeps the dtypes it was trained with."""
    source = parse_source(spec, f"frozen model {name!r}")
    model_config = source_model_config(source, **(dtypes if source.kind == "hf" else {}))
    abstract_model = nnx.eval_shape(lambda: models.build(model_config, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    shardings = shardings_of(abstract_params)
    pure = nnx.to_pure_dict(abstract_params)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pure, shardings
    )
    return FrozenModel(source, model_config, graphdef, abstract)


def load_frozen(frozen: FrozenModel, name: str, source: Source | None = None):
    """The parameters of a frozen model (from ``source``, default its own), on their shardings."""
    params, _ = load_params(
        source or frozen.source, frozen.abstract, field=f"frozen model {name!r}"
    )
    return params


def source_tokenizer(spec: str, field: str = "--model") -> str:
    """The tokenizer spec (for :func:`jaxlab.data.tokenizers.load_tokenizer`) that an
    ``hf:PATH`` or ``run:WORKDIR[@STEP]`` source brings: the Hugging Face directory itself, or the
    run's ``data.tokenizer`` in ``WORKDIR/config.json`` (``"byte"``, jaxlab's default, when the
    config names none). Errors name ``field``."""
    source = parse_source(spec, field)
    if source.kind == "hf":
        return source.path
    run_config = os.path.join(source.path, "config.json")
    if not os.path.isfile(run_config):
        raise ValueError(
            f"{field}: {spec!r} has no config.json naming its data.tokenizer (a model written by "
            "save_model_source); name the tokenizer explicitly"
        )
    with open(run_config) as f:
        return (json.load(f).get("data") or {}).get("tokenizer") or "byte"


def load_model(spec: str, field: str = "--model") -> nnx.Module:
    """The model of an ``hf:PATH`` or ``run:WORKDIR[@STEP]`` source, built from its own config
    with its parameters on the default device, ready for inference (errors name ``field``)."""
    source = parse_source(spec, field)
    if source.kind == "hf":
        from jaxlab.interop.hf import load_hf_llama

        return load_hf_llama(source.path)
    config = source_model_config(source)
    # Shapes only: the checkpoint provides every parameter, so none is drawn at random.
    model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        nnx.to_pure_dict(params),
    )
    loaded, _ = load_params(source, abstract, field=field)
    nnx.replace_by_pure_dict(params, loaded)
    return nnx.merge(graphdef, params, rest)

"""Builds an experiment from a config: mesh, tokenizer, model structure, optimizer, objective,
shardings (nothing allocated); then its first state and its jitted steps."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxlab.distill  # noqa: F401  (registers its objectives)
import jaxlab.eval.medical  # noqa: F401  (registers the benchmarks' finetuning record formats)
import jaxlab.mixing  # noqa: F401  (registers its objectives)
from jaxlab import models, objectives, optim
from jaxlab.data import pipeline
from jaxlab.data.tokenizers import Tokenizer
from jaxlab.train import pretrained, sharding
from jaxlab.train.step import (
    TrainState,
    activation_sharding_during_trace,
    make_eval_step,
    make_train_step,
)


@dataclasses.dataclass
class Experiment:
    """Everything ``train_and_evaluate`` builds from a config, before any step runs."""

    config: Any
    mesh: jax.sharding.Mesh
    tokenizer: Tokenizer
    model_config: Any  # the model's config dataclass (models.make_config)
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: TrainState
    abstract_state: TrainState
    rules: tuple
    objective: objectives.Objective
    frozen: dict[str, pretrained.FrozenModel]  # the frozen models the objective reads, by name
    trainable: Any  # pytree of bools like the parameters (False: config.optim.frozen), or None
    components: list[pipeline.Component]  # the data components (batch["domain"] indices)

    @property
    def frozen_shardings(self) -> dict[str, Any]:
        return {n: jax.tree.map(lambda a: a.sharding, f.abstract) for n, f in self.frozen.items()}


def validate_config(config) -> None:
    """Errors that name the field for values no run could use."""
    for field in ("num_steps", "batch_size", "seq_len", "eval_every", "checkpoint_every"):
        value = config[field]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{field} must be a positive int, got {value!r}")
    for field in ("eval_batches", "keep_checkpoints", "accum_steps", "log_every"):
        if config[field] < 1:
            raise ValueError(f"config.{field} must be >= 1, got {config[field]!r}")
    if config.batch_size % config.accum_steps:
        raise ValueError(
            f"config.batch_size={config.batch_size} must be divisible by "
            f"config.accum_steps={config.accum_steps}"
        )
    if config.init_from_mode not in ("exact", "partial"):
        raise ValueError(
            f"config.init_from_mode must be 'exact' or 'partial', got {config.init_from_mode!r}"
        )
    objectives.get_objective(config.objective.name).validate(config)


def _model_config(config, tokenizer: Tokenizer):
    values = config.model.to_dict()
    if not values.get("vocab_size"):
        values["vocab_size"] = tokenizer.vocab_size
    if values["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(
            f"config.model.vocab_size={values['vocab_size']} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size})"
        )
    model_config = models.make_config(values)
    if config.seq_len > model_config.max_seq_len:
        raise ValueError(
            f"config.seq_len={config.seq_len} exceeds config.model.max_seq_len="
            f"{model_config.max_seq_len}"
        )
    return model_config


def _check_export(config, model_config) -> None:
    """Refuses, before training, a ``config.export_hf`` the end of the run could not write."""
    from jaxlab.interop.hf import CheckpointError, check_hf_exportable, config_to_hf
    from jaxlab.models.transformer import canonical_dtype

    try:
        check_hf_exportable(model_config)
        dtype = config.get("export_hf_dtype") or model_config.param_dtype
        config_to_hf(model_config, canonical_dtype(dtype, "config.export_hf_dtype"))
    except (CheckpointError, ValueError) as e:
        raise ValueError(f"config.export_hf={config.export_hf!r}: {e}") from None


def build_experiment(config, devices=None) -> Experiment:
    """Mesh, tokenizer, model structure, optimizer and shardings (nothing allocated).

    ``devices`` replaces ``jax.devices()`` as the mesh's devices, e.g. those of a topology
    description (``jax.experimental.topologies``) to compile the steps ahead of time for
    cards this machine does not have."""
    validate_config(config)
    try:
        mesh = sharding.make_mesh(**config.mesh.to_dict(), devices=devices)
    except ValueError as e:
        raise ValueError(f"config.mesh: {e}") from None
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if (config.batch_size // config.accum_steps) % rows:
        raise ValueError(
            f"config.batch_size={config.batch_size} (per accumulation step "
            f"{config.batch_size // config.accum_steps}) must be divisible by the mesh's "
            f"data x fsdp = {rows}"
        )
    tokenizer = pipeline.make_tokenizer(config.data)
    model_config = _model_config(config, tokenizer)
    if config.get("export_hf"):
        _check_export(config, model_config)
    abstract_model = nnx.eval_shape(lambda: models.build(model_config, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    rules = tuple(tuple(rule) for rule in config.logical_axis_rules) or sharding.DEFAULT_RULES
    param_shardings = sharding.state_shardings(abstract_params, mesh, rules)
    schedule = optim.learning_rate_schedule(config.optim, config.num_steps)
    optimizer = optim.build_optimizer(config.optim, config.num_steps)
    pure_params = nnx.to_pure_dict(abstract_params)
    abstract_opt = jax.eval_shape(optimizer.init, pure_params)
    masked = optax.transforms.MaskedNode  # frozen leaves' places in a masked state
    opt_shardings = optax.tree_utils.tree_map_params(
        optimizer,
        lambda state, s: state if isinstance(state, masked) else s,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _: sharding.replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding | masked),
    )
    components = pipeline.build_components(config.data)  # read once per run
    dtypes = {"param_dtype": model_config.param_dtype, "dtype": model_config.dtype}
    registered = objectives.get_objective(config.objective.name)
    frozen = {
        name: pretrained.frozen_model(
            source,
            name,
            dtypes=dtypes,
            shardings_of=lambda a: sharding.state_shardings(a, mesh, rules),
        )
        for name, source in registered.frozen_models(config).items()
    }
    trainable = None
    if config.optim.get("frozen"):
        frozen_mask = optim.params_matching(pure_params, config.optim.frozen, "config.optim.frozen")
        trainable = jax.tree.map(lambda f: not f, frozen_mask)
    context = objectives.ObjectiveContext(
        config=config,
        graphdef=graphdef,
        frozen={n: f.graphdef for n, f in frozen.items()},
        model_config=model_config,
        frozen_configs={n: f.model_config for n, f in frozen.items()},
        params=pure_params,
        schedule=schedule,
        components=tuple(c.name for c in components),
        trainable=trainable,
    )
    objective = registered.build(context)
    abstract_objective = jax.eval_shape(objective.init)
    objective_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract_objective)
    shardings = TrainState(
        sharding.replicated(mesh), param_shardings, opt_shardings, objective_shardings
    )
    abstract = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32), pure_params, abstract_opt, abstract_objective
    )
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return Experiment(
        config,
        mesh,
        tokenizer,
        model_config,
        graphdef,
        optimizer,
        schedule,
        shardings,
        abstract,
        rules,
        objective,
        frozen,
        trainable,
        components,
    )


def init_state(exp: Experiment, params=None) -> TrainState:
    """Fresh parameters (``config.seed``; or ``params``, already placed) and optimizer state,
    created already sharded."""

    def init(params):
        if params is None:
            params = _random_params(exp)
        return TrainState(
            jnp.zeros((), jnp.int32), params, exp.optimizer.init(params), exp.objective.init()
        )

    return jax.jit(init, out_shardings=exp.state_shardings)(params)


def _random_params(exp: Experiment):
    model = models.build(exp.model_config, nnx.Rngs(exp.config.seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def initial_params(exp: Experiment):
    """The parameters a fresh run starts from: ``config.init_from`` (``hf:PATH``,
    ``run:WORKDIR[@STEP]``) or random (``config.seed``). Returns ``(params, report)``; the
    report lists the copied, kept (random) and unused parameter names, or is None."""
    config = exp.config
    if not config.init_from:
        return None, None
    source = pretrained.pinned(pretrained.parse_source(config.init_from))
    if config.init_from_mode == "exact":
        differences = pretrained.architecture_differences(
            exp.model_config, pretrained.source_model_config(source)
        )
        if differences:
            raise ValueError(
                f"config.init_from {source}: config.model differs from the "
                f"source's model in {differences}"
            )
    partial = config.init_from_mode == "partial"
    fallback = None
    if partial:
        fallback = jax.jit(lambda: _random_params(exp), out_shardings=exp.state_shardings.params)()
    params, report = pretrained.load_params(
        source,
        exp.abstract_state.params,
        partial=partial,
        mapping=list(config.init_from_map),
        fallback=fallback,
    )
    return params, {"source": str(source), **report}


def load_frozen(exp: Experiment, sources: dict[str, str] | None = None) -> dict[str, Any]:
    """``{name: params}`` of the objective's frozen models, on their shardings; ``sources``
    (``{name: "run:WORKDIR@STEP"}``, as :func:`pin_sources` wrote them) overrides where they are
    read from."""
    sources = sources or {}
    return {
        name: pretrained.load_frozen(
            f, name, pretrained.parse_source(sources[name]) if name in sources else None
        )
        for name, f in exp.frozen.items()
    }


SOURCES_FILE = "frozen_sources.json"


def pin_sources(exp: Experiment, workdir: str, fresh: bool) -> dict[str, str]:
    """The frozen models' sources with their checkpoint steps fixed: resolved now and written to
    ``WORKDIR/frozen_sources.json`` for a fresh run, read back from it on resume, so a resumed
    run reads the same teacher or reference even if that run trained on."""
    path = os.path.join(workdir, SOURCES_FILE)
    if not fresh and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    sources = {name: str(pretrained.pinned(f.source)) for name, f in exp.frozen.items()}
    if sources and jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(sources, f, indent=2)
    return sources


def compile_steps(exp: Experiment):
    """The jitted train step ``(state, batch, frozen) -> (state, metrics)`` (state donated;
    ``frozen`` from :func:`load_frozen`, ``{}`` when the objective reads no frozen model) and
    eval step ``(params, batch)``, with the experiment's shardings. Both are traced inside the
    activation-sharding rules of the mesh (the one place where they are applied)."""
    pinned = activation_sharding_during_trace(exp.mesh, exp.rules)
    step = make_train_step(
        exp.graphdef,
        exp.optimizer,
        objective=exp.objective,
        learning_rate=exp.schedule,
        trainable=exp.trainable,
        seed=exp.config.seed,
    )
    train_step = jax.jit(
        pinned(step),
        in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh), exp.frozen_shardings),
        out_shardings=(exp.state_shardings, sharding.replicated(exp.mesh)),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        pinned(make_eval_step(exp.graphdef)),
        in_shardings=(exp.state_shardings.params, sharding.batch_sharding(exp.mesh)),
        out_shardings=sharding.replicated(exp.mesh),
    )
    return train_step, eval_step

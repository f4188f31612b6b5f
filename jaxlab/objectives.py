"""Training objectives: what a train step minimises, chosen by name (``config.objective.name``).

An :class:`Objective` turns ``(params, batch, frozen, state, rng)`` into gradients:

* ``params``: the trained model's pure parameter dict;
* ``batch``: the device batch (``inputs, targets, loss_mask, segment_ids, positions`` [batch, seq]
  and any extra keys the objective lists in ``batch_keys``, such as a mixer's ``domain``);
* ``frozen``: ``{name: params}`` of the frozen models it asked for (a teacher, a reference),
  passed to the jitted step as sharded arguments, never captured by closure;
* ``state``: the objective's own state (a data mixer's weights), ``()`` for most;
* ``rng``: a key that depends only on the run's seed and the step (so resuming is exact).

Most objectives are a summed loss ``loss(params, batch, frozen, rng) -> (loss_sum, count,
metric_sums)``; :func:`from_loss` differentiates it with gradient accumulation over micro-batches,
which stays exact because sums (not means) are accumulated. Methods register a factory with
:func:`register_objective`: ``next_token`` lives here, the distillation KL in
:mod:`jaxlab.distill`, the DoGE and DoReMi mixers in :mod:`jaxlab.mixing`. The training engine
(:mod:`jaxlab.train`) names no method; it looks objectives up here.

**The step convention.** Every training step in jaxlab is :func:`make_train_step`: a pure, unjitted
``(state, batch, frozen={}) -> (state, metrics)`` over a :class:`TrainState` (``step``, ``params``,
``opt_state``, ``objective``: the objective's own state), which its caller jits (the engine with
shardings and donation, :func:`jaxlab.train.loop.compile_steps`; small drivers with a plain
``jax.jit``). It lives here, beside :class:`Objective`, so that the method packages below the
engine (the classifier training of :mod:`jaxlab.robust`, the mixer proxies of
:mod:`jaxlab.mixing`) use the same step without importing :mod:`jaxlab.train`; a method supplies
an objective, never a step of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlab.registry import Registry

Batch = dict[str, jax.Array]
# The batch entries every model objective reads.
MODEL_INPUTS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
# ``loss(params, batch, frozen, rng) -> (loss_sum, count, {name: sum})``
LossFn = Callable[[Any, Batch, Mapping[str, Any], jax.Array], tuple[jax.Array, jax.Array, dict]]
# ``gradients(params, batch, frozen, state, rng) -> (grads, state, metrics)``; metrics hold at
# least ``loss`` (mean per counted token) and ``tokens``.
GradientsFn = Callable[..., tuple[Any, Any, dict[str, jax.Array]]]


def model_logits(graphdef: nnx.GraphDef, params, batch: Batch) -> jax.Array:
    """``[batch, seq, vocab]`` float32 logits of ``(graphdef, params)`` on a packed batch."""
    model = nnx.merge(graphdef, params)
    return model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])


def token_losses(graphdef: nnx.GraphDef, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Per-token next-token cross-entropy ``[batch, seq]`` and the float loss mask."""
    logits = model_logits(graphdef, params, batch)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return losses, batch["loss_mask"].astype(jnp.float32)


def loss_sums(graphdef: nnx.GraphDef, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Summed masked cross-entropy and the number of target tokens (float32 scalars)."""
    losses, mask = token_losses(graphdef, params, batch)
    return jnp.sum(losses * mask), jnp.sum(mask)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a train step computes.

    Attributes:
      gradients: ``(params, batch, frozen, state, rng) -> (grads, state, metrics)``.
      init: ``() -> state`` (the objective's own state; ``()`` when it has none).
      batch_keys: batch entries it reads beyond ``model_inputs`` (e.g. ``("domain",)``).
      model_inputs: the batch entries its model reads (default :data:`MODEL_INPUTS`, a language
        model's packed batch; ``("x", "y")`` for a classifier); None passes the whole batch
        (objectives over batches a user's loss function defines).
      uniform_sampling: the data components must be sampled uniformly (a mixer's weights act on
        gradients or losses, not on sampling).
      on_checkpoint: ``(workdir, state) -> None``, called on process 0 after each checkpoint
        with the objective's state (e.g. a mixer writes ``domain_weights.json``).
    """

    gradients: GradientsFn
    init: Callable[[], Any] = lambda: ()
    batch_keys: tuple[str, ...] = ()
    model_inputs: tuple[str, ...] | None = MODEL_INPUTS
    uniform_sampling: bool = False
    on_checkpoint: Callable[[str, Any], None] | None = None


@dataclasses.dataclass(frozen=True)
class ObjectiveContext:
    """What a factory may read when it builds its objective (nothing here is allocated).

    Attributes:
      config: the run's whole ConfigDict.
      graphdef: the trained model's graph definition.
      frozen: ``{name: graphdef}`` of the frozen models the objective asked for.
      model_config: the trained model's config dataclass.
      frozen_configs: ``{name: config dataclass}`` of the frozen models.
      params: the trained model's parameters as ``ShapeDtypeStruct`` leaves.
      schedule: the learning-rate schedule.
      components: names of the data components, in the order of ``batch["domain"]`` indices.
      trainable: a pytree of bools like the parameters (False: ``config.optim.frozen``), or
        None when every parameter trains; objectives differentiate through
        :func:`stop_frozen` so frozen leaves get exact zero gradients at no cost.
    """

    config: Any
    graphdef: nnx.GraphDef
    frozen: Mapping[str, nnx.GraphDef]
    model_config: Any
    frozen_configs: Mapping[str, Any]
    params: Any
    schedule: optax.Schedule
    components: tuple[str, ...]
    trainable: Any = None


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective: ``build(context) -> Objective``; ``frozen_models(config) ->
    {name: source}`` (``hf:PATH``, ``run:WORKDIR[@STEP]``) the engine loads and passes in;
    ``validate(config)`` raises for settings the objective cannot use."""

    build: Callable[[ObjectiveContext], Objective]
    frozen_models: Callable[[Any], dict[str, str]] = lambda config: {}
    validate: Callable[[Any], None] = lambda config: None


OBJECTIVES: Registry[ObjectiveSpec] = Registry("objective", field="config.objective.name")


def register_objective(
    name: str,
    build: Callable[[ObjectiveContext], Objective],
    *,
    frozen_models: Callable[[Any], dict[str, str]] | None = None,
    validate: Callable[[Any], None] | None = None,
    replace: bool = False,
) -> None:
    """Makes ``config.objective.name == name`` train with ``build(context)``; ``replace=True``
    to override a registered objective."""
    spec = ObjectiveSpec(build)
    if frozen_models is not None:
        spec = dataclasses.replace(spec, frozen_models=frozen_models)
    if validate is not None:
        spec = dataclasses.replace(spec, validate=validate)
    OBJECTIVES.register(name, spec, replace=replace)


def available_objectives() -> tuple[str, ...]:
    return OBJECTIVES.names()


def get_objective(name: str) -> ObjectiveSpec:
    return OBJECTIVES.get(name)


def _micro_batches(batch: Batch, accum_steps: int) -> Batch:
    """``[batch, ...] -> [accum_steps, batch / accum_steps, ...]``, micro-batch ``i`` taking rows
    ``i, i + accum_steps, ...``: every device keeps contributing its own rows to each micro-batch
    (contiguous blocks would put each micro-batch on a fraction of the devices)."""

    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(
                f"batch size {x.shape[0]} is not divisible by accum_steps={accum_steps}"
            )
        return x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def stop_frozen(params, trainable):
    """``params`` with ``stop_gradient`` on the leaves ``trainable`` marks False (call it inside
    the differentiated function: their gradients are then exact zeros and XLA drops their
    backward computation)."""
    if trainable is None:
        return params
    return jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p), trainable, params)


def from_loss(loss: LossFn, accum_steps: int = 1, trainable=None) -> GradientsFn:
    """Gradients of ``sum(loss) / count`` over ``accum_steps`` micro-batches (scanned).

    The summed losses, counts, metric sums and gradients are accumulated, then divided once by
    the total count, so the result equals the full-batch gradient however the counted tokens
    fall across micro-batches. Micro-batch ``i`` gets ``fold_in(rng, i)``. Reported metrics:
    ``loss`` and every metric sum divided by the count, and ``tokens``.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")

    def summed(params, batch, frozen, rng):
        loss_sum, count, metrics = loss(stop_frozen(params, trainable), batch, frozen, rng)
        return loss_sum, (count, metrics)

    grad_of_sums = jax.value_and_grad(summed, has_aux=True)

    def gradients(params, batch, frozen, state, rng):
        def accumulate(carry, micro):
            index, loss_sum, count, metrics, grads = carry
            (micro_loss, (micro_count, micro_metrics)), micro_grads = grad_of_sums(
                params, micro, frozen, jax.random.fold_in(rng, index)
            )
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            metrics = jax.tree.map(jnp.add, metrics, micro_metrics)
            return (index + 1, loss_sum + micro_loss, count + micro_count, metrics, grads), None

        micro = _micro_batches(batch, accum_steps)
        first = jax.tree.map(lambda x: x[0], micro)
        metric_shapes = jax.eval_shape(lambda: loss(params, first, frozen, rng)[2])
        zeros = jax.tree.map(jnp.zeros_like, params)
        metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
        init = (jnp.int32(0), jnp.float32(0), jnp.float32(0), metric_zeros, zeros)
        (_, loss_sum, count, metric_sums, grads), _ = jax.lax.scan(accumulate, init, micro)
        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        metrics = {name: value / denominator for name, value in metric_sums.items()}
        metrics.update(loss=loss_sum / denominator, tokens=count)
        return grads, state, metrics

    return gradients


def next_token_loss(graphdef: nnx.GraphDef) -> LossFn:
    """Masked next-token cross-entropy, summed."""

    def loss(params, batch, frozen, rng):
        del frozen, rng
        loss_sum, count = loss_sums(graphdef, params, batch)
        return loss_sum, count, {}

    return loss


def _next_token(context: ObjectiveContext) -> Objective:
    return Objective(
        from_loss(next_token_loss(context.graphdef), context.config.accum_steps, context.trainable)
    )


register_objective("next_token", _next_token)


class TrainState(NamedTuple):
    """Everything a training step reads and writes.

    Attributes:
      step: [] int32, number of updates applied.
      params: pure dict of parameter arrays (``nnx.to_pure_dict`` of the model's ``Param`` state).
      opt_state: the optimizer's state.
      objective: the objective's own state (a data mixer's weights), or ``()``.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    objective: Any = ()


def init_train_state(
    params, optimizer: optax.GradientTransformation, objective_state: Any = ()
) -> TrainState:
    """Step 0: ``params``, a fresh optimizer state and ``objective_state`` (``objective.init()``
    for an objective with state of its own)."""
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), objective_state)


def _masked_norm(tree, trainable) -> jax.Array:
    if trainable is None:
        return optax.tree.norm(tree)
    kept = [x for x, t in zip(jax.tree.leaves(tree), jax.tree.leaves(trainable), strict=True) if t]
    return optax.tree.norm(kept)


def make_train_step(
    graphdef: nnx.GraphDef | None,
    optimizer: optax.GradientTransformation,
    *,
    objective: Objective | None = None,
    accum_steps: int = 1,
    learning_rate: optax.Schedule | None = None,
    trainable: Any = None,
    seed: int = 0,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """A pure ``(state, batch, frozen={}) -> (state, metrics)`` step (the step convention above).

    Args:
      graphdef: the model's graph definition (used for the default ``next_token`` objective;
        None with an ``objective``).
      optimizer: the optax transformation; frozen leaves must get zero updates from it
        (:func:`jaxlab.optim.build_optimizer` does this for ``config.optim.frozen``).
      objective: what to minimise; default next-token cross-entropy with ``accum_steps`` (an
        objective handles its own accumulation, see :func:`from_loss`).
      learning_rate: the schedule, reported as ``learning_rate``.
      trainable: a pytree of Python bools like the parameters; False leaves are frozen: their
        old values are kept bitwise and they are left out of ``grad_norm``.
      seed: the objective's per-step keys are ``fold_in(PRNGKey(seed), step)``.

    Metrics: the objective's (``loss``, ``tokens``, ...), ``grad_norm`` (before clipping),
    ``param_norm`` (after the update), and ``learning_rate`` if a schedule is given.
    """
    if objective is None:
        objective = Objective(from_loss(next_token_loss(graphdef), accum_steps, trainable))
    elif accum_steps != 1:
        raise ValueError(
            f"make_train_step: accum_steps={accum_steps} applies to the default objective only; "
            "an objective accumulates itself (from_loss)"
        )
    keys = None
    if objective.model_inputs is not None:
        keys = (*objective.model_inputs, *objective.batch_keys)
    base_key = jax.random.PRNGKey(seed)

    def train_step(state: TrainState, batch: Batch, frozen: Mapping[str, Any] | None = None):
        if keys is not None:
            batch = {k: batch[k] for k in keys}
        rng = jax.random.fold_in(base_key, state.step)
        grads, objective_state, metrics = objective.gradients(
            state.params, batch, frozen or {}, state.objective, rng
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if trainable is not None:  # frozen leaves stay bitwise (p + 0 would turn -0.0 into 0.0)
            params = jax.tree.map(
                lambda t, new, old: new if t else old, trainable, params, state.params
            )
        metrics = dict(metrics)
        metrics.update(grad_norm=_masked_norm(grads, trainable), param_norm=optax.tree.norm(params))
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate(state.step)
        return TrainState(state.step + 1, params, opt_state, objective_state), metrics

    return train_step

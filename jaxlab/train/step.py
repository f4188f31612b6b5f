"""Pure train and eval steps over ``(TrainState, batch, frozen)``.

The model is carried as an NNX graph definition (static) plus a pure dict of parameters, so the
steps are plain functions that ``jax.jit`` compiles with explicit shardings and donation. What a
step minimises is an :class:`jaxlab.objectives.Objective` (next-token loss, distillation KL, a
mixer's reweighted loss, ...); frozen models it reads (a teacher, a reference) arrive as the
``frozen`` argument, ``{name: params}``, sharded like any other input. Activation sharding is
applied where the steps are jitted (:func:`jaxlab.train.loop.compile_steps`), for every step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxlab.models.partitioning import Rules, activation_sharding
from jaxlab.objectives import (
    MODEL_INPUTS,
    Batch,
    Objective,
    from_loss,
    loss_sums,
    next_token_loss,
)

__all__ = [
    "MODEL_INPUTS",
    "TrainState",
    "activation_sharding_during_trace",
    "init_train_state",
    "make_eval_step",
    "make_train_step",
]


def activation_sharding_during_trace(mesh: Mesh | None, rules: Rules):
    """Decorator: trace ``fn`` inside :func:`activation_sharding`, so its jitted form keeps the
    activation constraints whoever calls it."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with activation_sharding(mesh, rules):
                return fn(*args, **kwargs)

        return wrapped

    return decorate


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


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


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
    """A pure ``(state, batch, frozen={}) -> (state, metrics)`` step.

    Args:
      graphdef: the model's graph definition (used for the default ``next_token`` objective).
      optimizer: the optax transformation; frozen leaves must get zero updates from it
        (:func:`jaxlab.optim.build_optimizer` does this for ``config.optim.frozen``).
      objective: what to minimise; default next-token cross-entropy with ``accum_steps`` (an
        objective handles its own accumulation, see :func:`jaxlab.objectives.from_loss`).
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
    keys = (*MODEL_INPUTS, *objective.batch_keys)
    base_key = jax.random.PRNGKey(seed)

    def train_step(state: TrainState, batch: Batch, frozen: Mapping[str, Any] | None = None):
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


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """``(params, batch) -> {"loss_sum", "tokens"}``; sum over batches, then divide."""

    def eval_step(params, batch: Batch):
        loss_sum, count = loss_sums(graphdef, params, batch)
        return {"loss_sum": loss_sum, "tokens": count}

    return eval_step

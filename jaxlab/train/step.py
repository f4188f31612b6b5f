"""Pure train and eval steps over ``(TrainState, batch, frozen)``.

The train step is jaxlab's one step convention, :func:`jaxlab.objectives.make_train_step` over a
:class:`jaxlab.objectives.TrainState` (defined with the objectives so that the method packages
below the engine, robust training and the mixer proxies, share it; re-exported here). This module
adds what only the engine needs: the eval step and activation sharding during tracing.

The model is carried as an NNX graph definition (static) plus a pure dict of parameters, so the
steps are plain functions that ``jax.jit`` compiles with explicit shardings and donation. What a
step minimises is an :class:`jaxlab.objectives.Objective` (next-token loss, distillation KL, a
mixer's reweighted loss, ...); frozen models it reads (a teacher, a reference) arrive as the
``frozen`` argument, ``{name: params}``, sharded like any other input. Activation sharding is
applied where the steps are jitted (:func:`jaxlab.train.loop.compile_steps`), for every step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxlab.models.partitioning import Rules, activation_sharding
from jaxlab.objectives import (
    MODEL_INPUTS,
    Batch,
    TrainState,
    init_train_state,
    loss_sums,
    make_train_step,
)

__all__ = [
    "MODEL_INPUTS",
    "TrainState",
    "activation_sharding_during_trace",
    "init_train_state",
    "loss_sums",
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


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """``(params, batch) -> {"loss_sum", "tokens"}``; sum over batches, then divide."""

    def eval_step(params, batch: Batch):
        loss_sum, count = loss_sums(graphdef, params, batch)
        return {"loss_sum": loss_sum, "tokens": count}

    return eval_step

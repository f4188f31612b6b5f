"""Projected first-order baselines for constrained VIs, with ACVI's interface.

Each ``run_<method>(problem, x0, *, num_steps, step_size)`` is one jitted ``lax.scan`` and returns a
:class:`Trajectory` (every iterate, and the cumulative operator-evaluation count). ``optimizer=``
(an optax transformation, e.g. Adam) replaces the plain step ``-step_size F`` by the optimizer's
update of the operator value, with the projection after every step as before:

* GDA: ``x <- P(x - g F(x))`` (1 evaluation per step);
* extragradient: ``x_half = P(x - g F(x))``, ``x <- P(x - g F(x_half))`` (2);
* optimistic GDA: ``x <- P(x - 2 g F(x_k) + g F(x_{k-1}))`` with ``F(x_{-1}) = F(x_0)`` (1);
* lookahead-GDA: ``k`` GDA steps, then ``x <- x_slow + alpha (x_fast - x_slow)`` (1 per inner
  step); one "step" of the trajectory is one GDA step, the averaging happens every ``k``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.solvers.problems import VIProblem

Optimizer = optax.GradientTransformation | None


class Trajectory(NamedTuple):
    """iterates: [num_steps, dim] after each step; evaluations: [num_steps] cumulative F calls."""

    iterates: jax.Array
    evaluations: jax.Array


def _check(problem: VIProblem, x0, step_size, num_steps, optimizer):
    x0 = jnp.asarray(x0)
    if x0.shape != (problem.dim,):
        raise ValueError(f"{problem.name}: x0 must have shape ({problem.dim},), got {x0.shape}")
    if (step_size is None) == (optimizer is None):
        raise ValueError(
            f"give exactly one of step_size and optimizer, got step_size={step_size} "
            f"and optimizer={optimizer}"
        )
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    return x0, jnp.asarray(0.0 if step_size is None else step_size, x0.dtype)


def _stepper(optimizer: Optimizer, step_size):
    """``(init(x) -> state, move(g, state, x) -> (delta, state))``: the plain step ``-g s`` or an
    optax transformation of the operator value (e.g. Adam, as the authors' GAN baselines use)."""
    if optimizer is None:
        return (lambda x: ()), (lambda g, state, x: (-step_size * g, state))
    return optimizer.init, optimizer.update


def run_gda(
    problem: VIProblem,
    x0,
    *,
    num_steps: int,
    step_size: float | None = None,
    optimizer: Optimizer = None,
) -> Trajectory:
    x0, step_size = _check(problem, x0, step_size, num_steps, optimizer)
    return _gda(problem, num_steps, optimizer, x0, step_size)


# Each loop is jitted with the problem, the step count and the optimizer static: one compilation
# per problem; the step size is traced, so a step-size sweep compiles once.
@jax.jit(static_argnums=(0, 1, 2))
def _gda(problem, num_steps, optimizer, x0, step_size):
    init, move = _stepper(optimizer, step_size)

    def step(carry, _):
        x, state = carry
        delta, state = move(problem.operator(x), state, x)
        x = problem.project(x + delta)
        return (x, state), x

    _, xs = jax.lax.scan(step, (x0, init(x0)), length=num_steps)
    return Trajectory(xs, jnp.arange(1, num_steps + 1))


def run_extragradient(
    problem: VIProblem,
    x0,
    *,
    num_steps: int,
    step_size: float | None = None,
    optimizer: Optimizer = None,
) -> Trajectory:
    x0, step_size = _check(problem, x0, step_size, num_steps, optimizer)
    return _extragradient(problem, num_steps, optimizer, x0, step_size)


@jax.jit(static_argnums=(0, 1, 2))
def _extragradient(problem, num_steps, optimizer, x0, step_size):
    init, move = _stepper(optimizer, step_size)

    def step(carry, _):
        x, state = carry
        delta, state = move(problem.operator(x), state, x)
        half = problem.project(x + delta)
        delta, state = move(problem.operator(half), state, half)
        x = problem.project(x + delta)
        return (x, state), x

    _, xs = jax.lax.scan(step, (x0, init(x0)), length=num_steps)
    return Trajectory(xs, 2 * jnp.arange(1, num_steps + 1))


def run_optimistic_gda(
    problem: VIProblem,
    x0,
    *,
    num_steps: int,
    step_size: float | None = None,
    optimizer: Optimizer = None,
) -> Trajectory:
    x0, step_size = _check(problem, x0, step_size, num_steps, optimizer)
    return _optimistic(problem, num_steps, optimizer, x0, step_size)


@jax.jit(static_argnums=(0, 1, 2))
def _optimistic(problem, num_steps, optimizer, x0, step_size):
    init, move = _stepper(optimizer, step_size)

    def step(carry, _):
        x, f_prev, state = carry
        f = problem.operator(x)
        delta, state = move(2 * f - f_prev, state, x)
        x = problem.project(x + delta)
        return (x, f, state), x

    _, xs = jax.lax.scan(step, (x0, problem.operator(x0), init(x0)), length=num_steps)
    return Trajectory(xs, jnp.arange(1, num_steps + 1) + 1)


def run_lookahead_gda(
    problem: VIProblem,
    x0,
    *,
    num_steps: int,
    step_size: float | None = None,
    optimizer: Optimizer = None,
    k: int = 5,
    alpha: float = 0.5,
) -> Trajectory:
    x0, step_size = _check(problem, x0, step_size, num_steps, optimizer)
    return _lookahead(problem, num_steps, optimizer, k, x0, step_size, alpha)


@jax.jit(static_argnums=(0, 1, 2, 3))
def _lookahead(problem, num_steps, optimizer, k, x0, step_size, alpha):
    init, move = _stepper(optimizer, step_size)

    def step(carry, i):
        x, slow, state = carry
        delta, state = move(problem.operator(x), state, x)
        x = problem.project(x + delta)
        sync = (i + 1) % k == 0
        averaged = slow + alpha * (x - slow)
        x = jnp.where(sync, averaged, x)
        slow = jnp.where(sync, averaged, slow)
        return (x, slow, state), x

    _, xs = jax.lax.scan(step, (x0, x0, init(x0)), jnp.arange(num_steps))
    return Trajectory(xs, jnp.arange(1, num_steps + 1))


BASELINES = {
    "gda": run_gda,
    "extragradient": run_extragradient,
    "optimistic_gda": run_optimistic_gda,
    "lookahead_gda": run_lookahead_gda,
}


def first_reach(errors, evaluations, target: float):
    """(iteration, operator evaluations) at which ``errors`` first drop below ``target``, 1-based,
    or None if they never do."""
    hit = np.flatnonzero(np.asarray(errors) < target)
    if not hit.size:
        return None
    return int(hit[0]) + 1, int(np.asarray(evaluations)[hit[0]])

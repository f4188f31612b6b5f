"""Projected first-order baselines for constrained VIs, with ACVI's interface.

Each ``run_<method>(problem, x0, *, step_size, num_steps)`` is one jitted ``lax.scan`` and returns a
:class:`Trajectory` (every iterate, and the cumulative operator-evaluation count):

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

from jaxlab.solvers.problems import VIProblem


class Trajectory(NamedTuple):
    """iterates: [num_steps, dim] after each step; evaluations: [num_steps] cumulative F calls."""

    iterates: jax.Array
    evaluations: jax.Array


def _check(problem: VIProblem, x0, step_size, num_steps):
    x0 = jnp.asarray(x0)
    if x0.shape != (problem.dim,):
        raise ValueError(f"{problem.name}: x0 must have shape ({problem.dim},), got {x0.shape}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    return x0


def run_gda(problem: VIProblem, x0, *, step_size: float, num_steps: int) -> Trajectory:
    return _gda(problem, num_steps, _check(problem, x0, step_size, num_steps), step_size)


# Each loop is jitted with the problem and the step count static: one compilation per problem.
@jax.jit(static_argnums=(0, 1))
def _gda(problem, num_steps, x0, step_size):
    def step(x, _):
        x = problem.project(x - step_size * problem.operator(x))
        return x, x

    _, xs = jax.lax.scan(step, x0, length=num_steps)
    return Trajectory(xs, jnp.arange(1, num_steps + 1))


def run_extragradient(problem: VIProblem, x0, *, step_size: float, num_steps: int) -> Trajectory:
    return _extragradient(problem, num_steps, _check(problem, x0, step_size, num_steps), step_size)


@jax.jit(static_argnums=(0, 1))
def _extragradient(problem, num_steps, x0, step_size):
    def step(x, _):
        half = problem.project(x - step_size * problem.operator(x))
        x = problem.project(x - step_size * problem.operator(half))
        return x, x

    _, xs = jax.lax.scan(step, x0, length=num_steps)
    return Trajectory(xs, 2 * jnp.arange(1, num_steps + 1))


def run_optimistic_gda(problem: VIProblem, x0, *, step_size: float,
                       num_steps: int) -> Trajectory:  # fmt: skip
    return _optimistic(problem, num_steps, _check(problem, x0, step_size, num_steps), step_size)


@jax.jit(static_argnums=(0, 1))
def _optimistic(problem, num_steps, x0, step_size):
    def step(carry, _):
        x, f_prev = carry
        f = problem.operator(x)
        x = problem.project(x - 2 * step_size * f + step_size * f_prev)
        return (x, f), x

    _, xs = jax.lax.scan(step, (x0, problem.operator(x0)), length=num_steps)
    return Trajectory(xs, jnp.arange(1, num_steps + 1) + 1)


def run_lookahead_gda(problem: VIProblem, x0, *, step_size: float, num_steps: int, k: int = 5,
                      alpha: float = 0.5) -> Trajectory:  # fmt: skip
    x0 = _check(problem, x0, step_size, num_steps)
    return _lookahead(problem, num_steps, k, x0, step_size, alpha)


@jax.jit(static_argnums=(0, 1, 2))
def _lookahead(problem, num_steps, k, x0, step_size, alpha):
    def step(carry, i):
        x, slow = carry
        x = problem.project(x - step_size * problem.operator(x))
        sync = (i + 1) % k == 0
        averaged = slow + alpha * (x - slow)
        x = jnp.where(sync, averaged, x)
        slow = jnp.where(sync, averaged, slow)
        return (x, slow), x

    _, xs = jax.lax.scan(step, (x0, x0), jnp.arange(num_steps))
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

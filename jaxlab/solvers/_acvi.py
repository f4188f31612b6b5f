"""ACVI: ADMM-based interior-point solvers for constrained VIs (Yang, Jordan, Chavdarova 2023;
Chavdarova, Pagliardini, Jordan, ... 2024 for the inexact and projection variants).

The VI over ``K = {E x = e} intersected with S`` is split: ``x`` carries F and the equalities,
``y`` the set ``S`` through a log barrier of weight ``mu``, coupled by ``x = y`` with dual ``lam``:

1. x-step: solve ``x + P F(x) / beta = P (y - lam / beta) + d`` with ``P = I - E^T (E E^T)^-1 E``
   and ``d = E^T (E E^T)^-1 e`` (the projector onto ``{E x = e}``);
2. y-step: ``y = argmin -mu log-barrier_S(y) + beta / 2 ||y - x - lam / beta||^2``;
3. dual step: ``lam <- lam + beta (x - y)``;
and ``mu`` shrinks geometrically (``mu_t = mu0 delta^t``, t = 1..T) over ``outer_steps`` stages of
``inner_steps`` iterations (the last stage runs ``last_inner_steps``).

Two choices make the four variants of the papers (ACVI, I-ACVI, P-ACVI, PI-ACVI):
* ``x_step="exact"``: a linear solve for affine F (factorised once), else Newton's method
  (``newton_steps`` iterations); ``x_step="inexact"``: ``subproblem_steps`` steps on the
  x-subproblem warm-started from the previous x, plain steps of ``subproblem_step_size`` or an optax
  ``subproblem_optimizer`` (whose state carries over between iterations).
* ``y_step="barrier"``: the barrier's exact proximal map (x0 strictly inside S);
  ``y_step="projection"``: no barrier, ``y = proj_S(x + lam / beta)`` (mu is unused).

Operator evaluations are counted per iteration: an exact affine x-step counts 1 (it uses the
matrix of F, factorised once), a Newton x-step ``newton_steps``, an inexact one
``subproblem_steps`` (plus the warm-up before the first iteration). Everything runs as one
``lax.scan`` over a precomputed ``mu`` schedule, or a ``lax.while_loop`` to a tolerance.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import optax

from jaxlab.solvers.problems import Inequalities, Polyhedron, VIProblem

X_STEPS = ("exact", "inexact")
Y_STEPS = ("barrier", "projection")


@dataclasses.dataclass(frozen=True)
class ACVIConfig:
    """Hyperparameters (see the module docstring); defaults follow the authors' 2-D notebook."""

    beta: float = 0.08
    mu0: float = 1e-5
    delta: float = 0.5
    outer_steps: int = 20
    inner_steps: int = 1
    last_inner_steps: int = 30
    x_step: str = "exact"
    y_step: str = "barrier"
    subproblem_steps: int = 10
    subproblem_step_size: float = 0.05
    newton_steps: int = 10
    # I-ACVI: an optax transformation (e.g. Adam, as in the authors' GAN runs) instead of plain
    # steps of subproblem_step_size; its state carries over between iterations (warm start).
    subproblem_optimizer: optax.GradientTransformation | None = None
    # I-ACVI: extra subproblem steps before the first iteration (the authors' lx_warmup).
    warmup_subproblem_steps: int = 0

    def __post_init__(self):
        if self.x_step not in X_STEPS:
            raise ValueError(f"ACVIConfig.x_step must be one of {X_STEPS}, got {self.x_step!r}")
        if self.y_step not in Y_STEPS:
            raise ValueError(f"ACVIConfig.y_step must be one of {Y_STEPS}, got {self.y_step!r}")
        for name in ("beta", "subproblem_step_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ACVIConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.mu0 >= 0 or not 0 < self.delta <= 1:
            raise ValueError(
                f"ACVIConfig: need mu0 >= 0 and 0 < delta <= 1, got mu0={self.mu0}, "
                f"delta={self.delta}"
            )
        for name in (
            "outer_steps",
            "inner_steps",
            "last_inner_steps",
            "subproblem_steps",
            "newton_steps",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ACVIConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.warmup_subproblem_steps, int) or self.warmup_subproblem_steps < 0:
            raise ValueError(
                f"ACVIConfig.warmup_subproblem_steps must be an int >= 0, got "
                f"{self.warmup_subproblem_steps!r}"
            )
        if self.x_step != "inexact" and (
            self.subproblem_optimizer is not None or self.warmup_subproblem_steps
        ):
            raise ValueError(
                "ACVIConfig: subproblem_optimizer and warmup_subproblem_steps apply "
                f"to x_step='inexact' only, got x_step={self.x_step!r}"
            )

    def mu_schedule(self) -> np.ndarray:
        """mu at every iteration: outer stage t = 1..T runs at mu0 delta^t (the authors decay mu
        before each stage, so mu0 itself is never used)."""
        stages = [
            np.full(self.inner_steps, self.mu0 * self.delta**t) for t in range(1, self.outer_steps)
        ]
        stages.append(np.full(self.last_inner_steps, self.mu0 * self.delta**self.outer_steps))
        return np.concatenate(stages)

    def evaluations_per_step(self, problem: VIProblem) -> int:
        if self.x_step == "inexact":
            return self.subproblem_steps
        return 1 if problem.matrix is not None else self.newton_steps


class ACVIState(NamedTuple):
    x: jax.Array
    y: jax.Array
    lam: jax.Array
    opt_state: optax.OptState = ()  # the I-ACVI subproblem optimizer's state, if any


class ACVITrajectory(NamedTuple):
    """x, y: [iterations, dim] after each iteration; evaluations: [iterations] cumulative."""

    x: jax.Array
    y: jax.Array
    evaluations: jax.Array


def _affine_projector(problem: VIProblem, dtype):
    """``(v -> P v, d)`` for ``{E x = e}``, applied matrix-free: ``P v = v - E^T (E E^T)^-1 E v``
    (E has few rows; a dense P would be dim x dim)."""
    if problem.equality is None:
        return (lambda v: v), None
    E, e = (np.asarray(v, np.float64) for v in problem.equality)
    gram = np.linalg.inv(E @ E.T)
    d = jnp.asarray(E.T @ gram @ e, dtype)
    E_j, gram_j = jnp.asarray(E, dtype), jnp.asarray(gram, dtype)
    return (lambda v: v - E_j.T @ (gram_j @ (E_j @ v))), d


def acvi(problem: VIProblem, x0, config: ACVIConfig = ACVIConfig()) -> ACVITrajectory:  # noqa: B008
    """Runs ACVI from ``x0`` (strictly inside S for the barrier y-step); see the module doc."""
    x0 = jnp.asarray(x0)
    _validate(problem, x0, config)
    return _run(problem, config, x0)


class ACVIResult(NamedTuple):
    """The last state, iterations run, their operator evaluations, and ``||x - y||`` at the end."""

    state: ACVIState
    iterations: jax.Array
    evaluations: jax.Array
    residual: jax.Array


def acvi_until(
    problem: VIProblem,
    x0,
    config: ACVIConfig = ACVIConfig(),
    *,
    tol: float = 1e-8,  # noqa: B008
    max_iterations: int = 10_000,
) -> ACVIResult:
    """ACVI in a ``lax.while_loop`` until the primal residual ``||x - y||`` and the step
    ``||x_k - x_{k-1}||`` are both below ``tol`` (or ``max_iterations``); mu follows the config's
    schedule and then stays at its last value."""
    x0 = jnp.asarray(x0)
    _validate(problem, x0, config)
    return _run_until(problem, config, x0, jnp.asarray(tol, x0.dtype), max_iterations)


def _validate(problem: VIProblem, x0, config: ACVIConfig):
    if x0.shape != (problem.dim,):
        raise ValueError(f"acvi: x0 must have shape ({problem.dim},), got {x0.shape}")
    if config.y_step == "barrier" and not bool(problem.inequality.interior(x0)):
        raise ValueError(
            f"acvi: x0 must be strictly inside the inequality set "
            f"{problem.inequality} for the log barrier (y_step='barrier'); "
            f"use y_step='projection' for an infeasible start"
        )


def _make_step(problem: VIProblem, config: ACVIConfig, x0):
    """``(init, step)`` for this problem (closed over its matrices): ``init()`` is the starting
    state (after the I-ACVI warm-up) and ``step(state, mu)`` one ACVI iteration."""
    dtype = x0.dtype
    beta = config.beta
    proj, d = _affine_projector(problem, dtype)
    shift = jnp.zeros_like(x0) if d is None else d
    F = problem.operator
    if config.x_step == "exact" and problem.matrix is not None:
        A = jnp.asarray(problem.matrix, dtype)
        b = jnp.zeros_like(x0) if problem.offset is None else jnp.asarray(problem.offset, dtype)
        lu = jsl.lu_factor(jnp.eye(problem.dim, dtype=dtype) + jax.vmap(proj, 1, 1)(A) / beta)
    optimizer = config.subproblem_optimizer
    if optimizer is None and config.x_step == "inexact":
        optimizer = optax.sgd(config.subproblem_step_size)

    def subproblem_steps(x, opt_state, rhs, num_steps):
        """Warm-started steps on the x-subproblem; its gradient, scaled by 1/beta, is
        ``x + P F(x) / beta - rhs``."""

        def one(_, carry):
            x, opt_state = carry
            updates, opt_state = optimizer.update(x + proj(F(x)) / beta - rhs, opt_state, x)
            return x + updates, opt_state

        return jax.lax.fori_loop(0, num_steps, one, (x, opt_state))

    def exact_x_step(x, rhs):
        if problem.matrix is not None:
            return jsl.lu_solve(lu, rhs - proj(b) / beta)

        def newton_step(_, x):
            residual = x + proj(F(x)) / beta - rhs
            jac = jnp.eye(problem.dim, dtype=dtype) + proj(jax.jacfwd(F)(x)) / beta
            return x - jnp.linalg.solve(jac, residual)

        return jax.lax.fori_loop(0, config.newton_steps, newton_step, x)

    def y_step(x, y, lam, mu):
        c = x + lam / beta
        if config.y_step == "projection":
            return problem.inequality.project(c)
        if isinstance(problem.inequality, Polyhedron | Inequalities):  # Newton from previous y
            return problem.inequality.barrier_prox(c, mu, beta, start=y)
        return problem.inequality.barrier_prox(c, mu, beta)

    def init():
        opt_state = () if optimizer is None else optimizer.init(x0)
        x = x0
        if config.warmup_subproblem_steps:
            x, opt_state = subproblem_steps(
                x0, opt_state, proj(x0) + shift, config.warmup_subproblem_steps
            )
        return ACVIState(x, x0, jnp.zeros_like(x0), opt_state)

    def step(state, mu):
        rhs = proj(state.y - state.lam / beta) + shift
        if config.x_step == "exact":
            x, opt_state = exact_x_step(state.x, rhs), state.opt_state
        else:
            x, opt_state = subproblem_steps(state.x, state.opt_state, rhs, config.subproblem_steps)
        y = y_step(x, state.y, state.lam, mu)
        return ACVIState(x, y, state.lam + beta * (x - y), opt_state)

    return init, step


@jax.jit(static_argnums=(0, 1, 4))
def _run_until(problem, config, x0, tol, max_iterations):
    init, step = _make_step(problem, config, x0)
    mus = jnp.asarray(config.mu_schedule(), x0.dtype)

    def cond(carry):
        state, k, moved = carry
        residual = jnp.linalg.norm(state.x - state.y)
        return (k < max_iterations) & ((residual > tol) | (moved > tol) | (k == 0))

    def body(carry):
        state, k, _ = carry
        new = step(state, mus[jnp.minimum(k, mus.shape[0] - 1)])
        return new, k + 1, jnp.linalg.norm(new.x - state.x)

    start = (init(), jnp.int32(0), jnp.asarray(jnp.inf, x0.dtype))
    state, k, _ = jax.lax.while_loop(cond, body, start)
    evaluations = config.warmup_subproblem_steps + config.evaluations_per_step(problem) * k
    return ACVIResult(state, k, evaluations, jnp.linalg.norm(state.x - state.y))


def _run_trajectory(problem: VIProblem, config: ACVIConfig, x0):
    init, step = _make_step(problem, config, x0)

    def record(state, mu):
        state = step(state, mu)
        return state, (state.x, state.y)

    mus = jnp.asarray(config.mu_schedule(), x0.dtype)
    _, (xs, ys) = jax.lax.scan(record, init(), mus)
    per_step = config.evaluations_per_step(problem)
    evaluations = config.warmup_subproblem_steps + per_step * jnp.arange(1, mus.shape[0] + 1)
    return ACVITrajectory(xs, ys, evaluations)


# One compilation per (problem, config): the problem and config are static, x0 is traced.
_run = jax.jit(_run_trajectory, static_argnums=(0, 1))

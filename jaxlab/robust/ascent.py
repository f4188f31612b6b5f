"""Projected ascent inside a norm ball around each input: the loop behind every perturbation.

Steps are per sample: ``linf`` takes signed steps ``step_size sign(g)``, ``l2`` normalised steps
``step_size g / ||g||``; after each step ``delta`` is projected back onto the ball of radius
``epsilon`` and, with ``clip=(lo, hi)``, ``x + delta`` into the valid input range. With
``random_stop`` each sample stops after its own number of steps drawn uniformly from
``1..num_steps`` (the UDP authors' ``uniform`` sample-iteration rule), so perturbation radii vary
across the batch.

The gradient of the summed per-sample objective is each sample's own gradient only when the model
treats samples independently (no batch statistics): the classifiers here do.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

NORMS = ("linf", "l2")


def check_ball(epsilon, step_size, num_steps, norm):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not epsilon >= 0 or not step_size > 0:
        raise ValueError(
            f"need epsilon >= 0 and step_size > 0, got epsilon={epsilon}, step_size={step_size}"
        )
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")


def _per_sample_norm(v):
    return jnp.sqrt(jnp.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))


def project_ball(delta, epsilon, norm: str):
    """Each sample's ``delta`` onto ``{||d|| <= epsilon}``."""
    if norm == "linf":
        return jnp.clip(delta, -epsilon, epsilon)
    scale = jnp.minimum(1.0, epsilon / jnp.maximum(_per_sample_norm(delta), 1e-12))
    return delta * scale


def ascent_direction(grad, norm: str):
    """The steepest-ascent unit step for the norm: ``sign(g)`` or ``g / ||g||_2``."""
    if norm == "linf":
        return jnp.sign(grad)
    return grad / jnp.maximum(_per_sample_norm(grad), 1e-12)


def random_in_ball(rng, shape, epsilon, norm: str, dtype):
    """Uniform in the l-inf box; for l2, a uniform direction with radius ``epsilon U^(1/d)``."""
    if norm == "linf":
        return jax.random.uniform(rng, shape, dtype, -epsilon, epsilon)
    direction_rng, radius_rng = jax.random.split(rng)
    direction = jax.random.normal(direction_rng, shape, dtype)
    direction = ascent_direction(direction, "l2")
    dim = 1
    for size in shape[1:]:
        dim *= size
    radius = epsilon * jax.random.uniform(
        radius_rng, (shape[0],) + (1,) * (len(shape) - 1), dtype
    ) ** (1.0 / dim)
    return direction * radius


def ascend(
    objective: Callable[[jax.Array], jax.Array],
    x,
    rng,
    *,
    epsilon: float,
    step_size: float,
    num_steps: int,
    norm: str = "linf",
    random_start: bool = False,
    random_stop: bool = False,
    clip: tuple[float, float] | None = None,
    initial_delta=None,
):
    """``x + delta`` after projected ascent of ``objective(x_adv) -> [batch]`` (module doc).
    ``delta`` starts at 0, uniform in the ball (``random_start``) or at ``initial_delta``."""
    check_ball(epsilon, step_size, num_steps, norm)
    x = jnp.asarray(x)
    start_rng, stop_rng = jax.random.split(rng)
    delta = jnp.zeros_like(x) if initial_delta is None else jnp.asarray(initial_delta, x.dtype)
    if random_start:
        delta = random_in_ball(start_rng, x.shape, epsilon, norm, x.dtype)
    if random_stop:
        stops = jax.random.randint(stop_rng, (x.shape[0],), 1, num_steps + 1)
    else:
        stops = jnp.full((x.shape[0],), num_steps)
    stops = stops.reshape((-1,) + (1,) * (x.ndim - 1))
    grad = jax.grad(lambda d: jnp.sum(objective(x + d)))

    def constrain(delta):
        delta = project_ball(delta, epsilon, norm)
        if clip is not None:
            delta = jnp.clip(x + delta, *clip) - x
        return delta

    def step(k, delta):
        moved = constrain(delta + step_size * ascent_direction(grad(delta), norm))
        return jnp.where(k < stops, moved, delta)

    delta = jax.lax.fori_loop(0, num_steps, step, constrain(delta))
    return jax.lax.stop_gradient(x + delta)
